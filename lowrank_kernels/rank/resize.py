"""Optimizer-state remap for a resized :class:`~lowrank_kernels.nn.LowRankLinear`.

When ``layer.resize(k)`` changes ``U (out, r) -> (out, k)`` and ``V (r, in) -> (k, in)`` in place, the
optimizer's per-parameter state still has the old shapes. The adaptive low-rank training code rebuilt AdamW
and lost every moment, which spikes the loss (Adam's first step from empty state moves each weight by about
``lr * sign(g)``).
Here the state follows the change of basis described by the layer's :class:`~lowrank_kernels.nn.ResizeInfo`:

* **first moments** (``exp_avg``, ``momentum_buffer``): averages of gradients, so they are mapped exactly as
  gradients map, ``m_U -> m_U @ right`` and ``m_V -> left^T @ m_V`` (exact for the current gradient when the
  function is kept, i.e. growing; first order when shrinking);
* **second moments** (``exp_avg_sq``, ``max_exp_avg_sq``): elementwise averages of squared gradients have no
  exact map. Treating the gradient entries that get mixed as uncorrelated, the variance of a linear
  combination is the combination of variances with squared coefficients: ``v_U -> v_U @ right**2``,
  ``v_V -> (left**2)^T @ v_V``, clamped at 0 (it is non-negative already; the clamp guards round-off);
* scalars (``step``) are kept, so Adam's bias correction does not restart;
* added directions (the last ``info.added`` columns of ``U`` / rows of ``V``) start at zero in every moment,
  dropped directions are discarded (they are outside the maps' range).

Optimizers supported: anything whose state per parameter holds the keys above plus scalars (``torch.optim``
``Adam``/``AdamW``/``SGD``, ``AdamQ3R``). A state tensor of the parameter's shape under an unknown key cannot be
mapped: that parameter's whole state is dropped (as ``state_policy="reset"`` would) with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch

FIRST_MOMENT_KEYS = ("exp_avg", "momentum_buffer")
SECOND_MOMENT_KEYS = ("exp_avg_sq", "max_exp_avg_sq")
STATE_POLICIES = ("carry", "reset")


def unwrap_optimizer(optimizer):
    """The ``torch.optim.Optimizer`` under wrappers such as accelerate's ``AcceleratedOptimizer``."""
    seen = 0
    while optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer) and seen < 8:
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer (or wrap one), got {type(optimizer).__name__}")
    return optimizer


def _map_state_tensor(key: str, t: torch.Tensor, grad_map, sq_map) -> torch.Tensor | None:
    if key in FIRST_MOMENT_KEYS:
        return grad_map(t)
    if key in SECOND_MOMENT_KEYS:
        return sq_map(t).clamp_min_(0)
    return None


def _remap_param_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, old_shape: torch.Size,
                       grad_map, sq_map) -> None:
    state = optimizer.state.get(param)
    if not state:
        return
    new_state = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape != old_shape:
            new_state[key] = value  # scalars (step) and unrelated entries are shape-independent
            continue
        mapped = _map_state_tensor(key, value, grad_map, sq_map)
        if mapped is None:
            warnings.warn(f"optimizer state key {key!r} of shape {tuple(old_shape)} has no known remap; the "
                          f"state of this parameter is reset", RuntimeWarning, stacklevel=4)
            del optimizer.state[param]
            return
        new_state[key] = mapped.to(value.dtype).contiguous()
    state.clear()
    state.update(new_state)


def remap_lowrank_state(optimizer, U: torch.Tensor, V: torch.Tensor, info, old_U_shape: torch.Size,
                        old_V_shape: torch.Size) -> None:
    """Map the optimizer state of ``U``/``V`` through ``info`` (a ``ResizeInfo``) in place.

    ``old_U_shape (out, r)``, ``old_V_shape (r, in)``: the shapes before the resize (state tensors of any other
    shape are left alone). After the call every moment has the new shape ``(out, k)`` / ``(k, in)``.
    """
    optimizer = unwrap_optimizer(optimizer)
    if optimizer is None:
        return
    # maps are tiny (r x k); fp32 at least so that bf16 moments are not mixed in bf16
    right = info.right.float()
    left = info.left.float()

    def up(t):
        return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t

    def grad_u(t):
        return up(t) @ right.to(t.device, up(t).dtype)

    def sq_u(t):
        return up(t) @ right.square().to(t.device, up(t).dtype)

    def grad_v(t):
        return left.t().to(t.device, up(t).dtype) @ up(t)

    def sq_v(t):
        return left.square().t().to(t.device, up(t).dtype) @ up(t)

    _remap_param_state(optimizer, U, old_U_shape, grad_u, sq_u)
    _remap_param_state(optimizer, V, old_V_shape, grad_v, sq_v)


def reset_state(optimizer, params: Iterable[torch.Tensor]) -> None:
    """Forget the optimizer state of ``params`` (Adam re-initializes it, ``step`` included, on its next step)."""
    optimizer = unwrap_optimizer(optimizer)
    if optimizer is None:
        return
    for p in params:
        optimizer.state.pop(p, None)


def resize_with_state(layer, new_rank: int, optimizer=None, state_policy: str = "carry"):
    """``layer.resize(new_rank)`` plus the optimizer-state update; returns the layer's ``ResizeInfo``.

    ``state_policy="carry"`` remaps the moments (see the module docstring), ``"reset"`` drops the state of
    ``U`` and ``V``. Gradients of the old shape are cleared (set to ``None``) so the next backward starts clean.
    """
    if state_policy not in STATE_POLICIES:
        raise ValueError(f"state_policy must be one of {STATE_POLICIES}, got {state_policy!r}")
    U, V = layer.U, layer.V
    old_u, old_v = U.shape, V.shape
    info = layer.resize(new_rank)
    if layer.U is not U or layer.V is not V:
        raise RuntimeError(f"{type(layer).__name__}.resize replaced its Parameter objects; the optimizer would "
                           f"keep training the old ones")
    for p in (U, V):
        if p.grad is not None and p.grad.shape != p.shape:
            p.grad = None
    if optimizer is not None:
        if state_policy == "carry":
            remap_lowrank_state(optimizer, U, V, info, old_u, old_v)
        else:
            reset_state(optimizer, (U, V))
    return info


# ------------------------------------------------------------------------------------------ batched resize
def resize_many(layers: list, new_ranks: list[int], optimizer=None, state_policy: str = "carry") -> list:
    """:func:`resize_with_state` for several ``LowRankLinear`` layers; returns their ``ResizeInfo`` in order.

    Layers that share ``(out, in, old rank, new rank, dtype, device)`` are resized together with a fixed
    number of batched ops (the same maths as ``LowRankLinear.resize``: batched QR of the factors, one batched
    SVD of the ``r x r`` cores, batched maps), and, under ``state_policy="carry"``, their optimizer moments are
    mapped with batched products too when every layer of the group holds the same state keys. Each
    parameter still gets storage of its own (one multi-tensor copy per group), so the layers stay independent
    (state dicts, safetensors). A group of one layer, or a subclass overriding ``resize``, takes the per-layer
    :func:`resize_with_state`. Growing draws the new directions of a group in one ``randn``, so they differ
    from a per-layer resize's draws (both are random orthonormal completions).
    """
    from ..nn.lowrank_linear import LowRankLinear

    if state_policy not in STATE_POLICIES:
        raise ValueError(f"state_policy must be one of {STATE_POLICIES}, got {state_policy!r}")
    if len(layers) != len(new_ranks):
        raise ValueError(f"got {len(layers)} layers but {len(new_ranks)} ranks")
    optimizer = unwrap_optimizer(optimizer)
    groups: dict[tuple, list[int]] = {}
    for i, (m, k) in enumerate(zip(layers, new_ranks, strict=True)):
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(m.in_features, m.out_features):
            raise ValueError(f"new rank {k!r} of layer {i} ({m.in_features} -> {m.out_features}) must be an int in "
                             f"[1, {min(m.in_features, m.out_features)}]")
        batchable = type(m).resize is LowRankLinear.resize and k != m.rank
        key = (m.out_features, m.in_features, m.rank, k, m.U.dtype, m.U.device) if batchable else ("single", i)
        groups.setdefault(key, []).append(i)
    infos: list = [None] * len(layers)
    for idx in groups.values():
        if len(idx) == 1:
            infos[idx[0]] = resize_with_state(layers[idx[0]], new_ranks[idx[0]], optimizer, state_policy)
            continue
        group_infos = _resize_group([layers[i] for i in idx], new_ranks[idx[0]], optimizer, state_policy)
        for i, info in zip(idx, group_infos, strict=True):
            infos[i] = info
    return infos


def _completion_batched(q: torch.Tensor, extra: int, s: torch.Tensor) -> torch.Tensor:
    """``(g, extra, n)``: per matrix, orthonormal rows orthogonal to the columns of ``q[i] (n, r)``, scaled by
    ``sqrt`` of the smallest positive entry of ``s[i]`` (1 when there is none); ``LowRankLinear._completion``
    batched, without a host sync."""
    g = torch.randn(q.shape[0], q.shape[1], extra, dtype=q.dtype, device=q.device)
    for _ in range(2):  # project twice: one Gram-Schmidt pass loses orthogonality in floating point
        g = g - torch.bmm(q, torch.bmm(q.mT, g))
    basis = torch.linalg.qr(g).Q
    s_min = torch.where(s > 0, s, float("inf")).amin(dim=1)
    scale = torch.where(torch.isfinite(s_min), s_min, 1.0).sqrt()
    return basis.mT * scale[:, None, None]


def _into_new_storage(batch: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """The slices of ``batch`` as ``dtype`` tensors with storage of their own (one cast, one multi-tensor copy)."""
    batch = batch.to(dtype)
    out = [torch.empty(batch.shape[1:], dtype=dtype, device=batch.device) for _ in range(batch.shape[0])]
    torch._foreach_copy_(out, list(batch.unbind(0)))
    return out


@torch.no_grad()
def _resize_group(layers: list, new: int, optimizer, state_policy: str) -> list:
    from ..nn.lowrank_linear import ResizeInfo, forget_grad_accumulator

    m0 = layers[0]
    old, dtype, g = m0.rank, m0.U.dtype, len(layers)
    U = torch.stack([m.U.detach() for m in layers]).double()  # (g, out, r)
    V = torch.stack([m.V.detach() for m in layers]).double()  # (g, r, in)
    q_u, r_u = torch.linalg.qr(U)
    q_v, r_v = torch.linalg.qr(V.mT)
    p, s, qh = torch.linalg.svd(torch.bmm(r_u, r_v.mT))
    k = min(old, new)
    root = s[:, :k].sqrt()
    u_new = torch.bmm(q_u, p[:, :, :k]) * root[:, None, :]
    v_new = root[:, :, None] * torch.bmm(qh[:, :k], q_v.mT)
    left = U.new_zeros(g, old, new)
    right = torch.zeros_like(left)
    left[:, :, :k] = torch.bmm(torch.linalg.pinv(r_u), p[:, :, :k] * root[:, None, :])
    right[:, :, :k] = torch.bmm(torch.linalg.pinv(r_v), qh[:, :k].mT * root[:, None, :])
    sv = U.new_zeros(g, new)
    sv[:, :k] = s[:, :k]
    if new > old:
        extra = new - old
        u_new = torch.cat([u_new, u_new.new_zeros(g, m0.out_features, extra)], dim=2)
        v_new = torch.cat([v_new, _completion_batched(q_v, extra, s)], dim=1)
    old_u, old_v = m0.U.shape, m0.V.shape
    for m, u_data, v_data in zip(layers, _into_new_storage(u_new, dtype), _into_new_storage(v_new, dtype),
                                 strict=True):
        for param, data in ((m.U, u_data), (m.V, v_data)):
            param.data = data
            forget_grad_accumulator(param)
            if param.grad is not None and param.grad.shape != param.shape:
                param.grad = None
    # The maps stay fp32 even for bf16/fp16 factors: they are applied to fp32 optimizer moments.
    maps_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    left_m, right_m, sv_m = left.to(maps_dtype), right.to(maps_dtype), sv.to(maps_dtype)
    infos = [ResizeInfo(old, new, left_m[i], right_m[i], sv_m[i]) for i in range(g)]
    if optimizer is not None:
        if state_policy == "reset":
            reset_state(optimizer, [p for m in layers for p in (m.U, m.V)])
        else:
            _remap_group_state(optimizer, [m.U for m in layers], old_u, "U", right_m)
            _remap_group_state(optimizer, [m.V for m in layers], old_v, "V", left_m)
    return infos


def _remap_group_state(optimizer, params: list[torch.Tensor], old_shape: torch.Size, side: str,
                       maps: torch.Tensor) -> None:
    """Map the moments of ``params`` (one factor of every layer of a group) in batched products.

    ``side="U"``: ``m -> m @ right``, ``v -> v @ right**2``; ``"V"``: ``m -> left^T @ m``, ``v -> (left**2)^T @ v``
    (see the module docstring); ``maps (g, r, k)``. Parameters whose states differ in keys or dtypes, or hold an
    unknown key of the old shape, are mapped one by one (:func:`_remap_param_state`, which warns and resets
    on an unknown key).
    """
    states = [optimizer.state.get(p) for p in params]
    shaped = [sorted(k for k, v in st.items() if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape == old_shape)
              if st else None for st in states]
    keys = shaped[0]
    uniform = (keys is not None and all(s == keys for s in shaped)
               and all(k in FIRST_MOMENT_KEYS + SECOND_MOMENT_KEYS for k in keys)
               and all(len({st[k].dtype for st in states}) == 1 and len({st[k].device for st in states}) == 1
                       for k in keys))
    if not uniform:
        for i, p in enumerate(params):
            m = maps[i]
            if side == "U":
                _remap_param_state(optimizer, p, old_shape, lambda t, m=m: _up(t) @ m.to(t.device, _up(t).dtype),
                                   lambda t, m=m: _up(t) @ m.square().to(t.device, _up(t).dtype))
            else:
                _remap_param_state(optimizer, p, old_shape, lambda t, m=m: m.t().to(t.device, _up(t).dtype) @ _up(t),
                                   lambda t, m=m: m.square().t().to(t.device, _up(t).dtype) @ _up(t))
        return
    for key in keys:
        value0 = states[0][key]
        stacked = _up(torch.stack([st[key] for st in states]))
        m = maps.to(stacked.device, stacked.dtype)
        if key in SECOND_MOMENT_KEYS:
            m = m.square()
        mapped = torch.bmm(stacked, m) if side == "U" else torch.bmm(m.mT, stacked)
        if key in SECOND_MOMENT_KEYS:
            mapped = mapped.clamp_min_(0)
        for st, t in zip(states, _into_new_storage(mapped, value0.dtype), strict=True):
            st[key] = t


def _up(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
