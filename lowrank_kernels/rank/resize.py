"""Optimizer-state remap for a resized :class:`~lowrank_kernels.nn.LowRankLinear`.

When ``layer.resize(k)`` changes ``U (out, r) -> (out, k)`` and ``V (r, in) -> (k, in)`` in place, the
optimizer's per-parameter state still has the old shapes. The seed rebuilt AdamW and lost every moment,
which spikes the loss (Adam's first step from empty state moves each weight by about ``lr * sign(g)``).
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
