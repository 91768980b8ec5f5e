"""Largest singular value and stable rank of many matrices at once, by power iteration.

``spectral_norm(mats)`` takes a list of 2-D tensors of mixed shapes and dtypes (e.g. every Linear weight of
a model) and returns ``sigma_max`` of each. The Triton kernel runs the whole iteration loop in one launch
per dtype group (one program per matrix, addresses and shapes from a table), or, for one or two iterations
over matrices of very unequal size, two load-balanced launches per iteration; the PyTorch reference loops.

Each matrix is iterated on its shorter side: ``A = W`` when ``m >= n``, else ``A = W^T``, so the kept
vector has length ``min(m, n)``. One iteration computes ``z = A^T (A v)`` and takes
``sigma^2 ~= ||z||`` (``v`` a unit vector; this bounds the Rayleigh quotient ``||A v||^2`` from above and
``sigma_max^2`` from below, so it is the better of the two free estimates), then ``v <- z / ||z||``. A zero
(or non-finite) ``z`` keeps the old ``v`` so a matrix that is zero for a while (a LoRA ``B`` at init), or
a step with NaN/Inf weights, does not lose or poison its vector. ``||W||_F^2`` comes from the same pass,
so ``stable_rank = ||W||_F^2 / sigma_max^2`` is free.

Scaling: ``||z|| ~ sigma^2`` is formed as ``sqrt(sum z^2)``, whose intermediate ``sigma^4`` leaves fp32's range
for ``sigma`` beyond ~1e9 or below ~1e-10. Each matrix is therefore read as ``2^-e W`` with ``2^e <= max|W| <
2^(e+1)`` (:func:`inverse_scales`: one max-abs pass over all matrices, a multi-tensor op), so its entries lie in
``[0.5, 1)`` and ``sigma`` in ``[0.5, sqrt(m n)]``; results are scaled back exactly (powers of two). Any matrix
whose entries are finite fp32 values gets a finite ``sigma_max`` and stable rank (rtol as for unit-scale
inputs); ``||W||_F^2`` itself overflows to ``inf`` once ``||W||_F`` exceeds ~1.8e19, as its fp32 value must.

Warm start: pass a :class:`PowerIterationState`; its vectors carry over between calls with the same
shapes, and on a slowly changing matrix (a weight during training) one iteration per call keeps
``sigma_max`` converged, as ``torch.nn.utils.parametrizations.spectral_norm`` does.

For factored weights ``W = U V`` the factored variants get ``sigma_max`` exactly from an ``r x r`` core
``R (V V^T) R^T`` with ``U = Q R`` (never forming ``U V``), batched per ``(out, in, dtype, device)`` group with
ranks zero-padded, and one batched eigensolver over all pairs: a fixed number of ops per group, whatever
the number of pairs (the rank controller's decision rests on this).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import backend
from .._checks import as_list, check_positive_int, check_tensor

DEFAULT_ITERS = 30
DEFAULT_TOL = 1e-6

_OP = "power_iteration"


# ------------------------------------------------------------------------------------------------ state
class PowerIterationState:
    """Unit vectors kept between :func:`spectral_norm` calls, keyed by the list's shapes and device.

    A call whose matrices have the same shapes (in the same order, on the same device) as an earlier one
    starts from that call's final vectors; other lists get their own entry. Vectors live in one flat fp32
    buffer per entry, matrix ``i`` owning ``min(m_i, n_i)`` consecutive elements.
    """

    def __init__(self) -> None:
        self._vectors: dict[tuple, torch.Tensor] = {}

    @staticmethod
    def key(mats: Sequence[torch.Tensor]) -> tuple:
        return (str(mats[0].device),) + tuple((int(W.shape[0]), int(W.shape[1])) for W in mats)

    def get(self, mats: Sequence[torch.Tensor]) -> torch.Tensor | None:
        return self._vectors.get(self.key(mats))

    def put(self, mats: Sequence[torch.Tensor], vectors: torch.Tensor) -> None:
        self._vectors[self.key(mats)] = vectors

    def reset(self) -> None:
        self._vectors.clear()

    def __len__(self) -> int:
        return len(self._vectors)

    def state_dict(self) -> dict:
        return {"keys": list(self._vectors), "vectors": [v.detach().cpu() for v in self._vectors.values()]}

    def load_state_dict(self, state: dict) -> None:
        self._vectors = {tuple(tuple(k) if isinstance(k, list) else k for k in key): v.clone()
                         for key, v in zip(state["keys"], state["vectors"], strict=True)}


# ------------------------------------------------------------------------------------------------ checks
def _check_mats(mats) -> list[torch.Tensor]:
    mats = as_list(mats, "mats")
    for i, W in enumerate(mats):
        check_tensor(W, f"mats[{i}]", ndim=2)
        if W.shape[0] == 0 or W.shape[1] == 0:
            raise ValueError(f"mats[{i}] must not be empty, got shape {tuple(W.shape)}")
        if W.device != mats[0].device:
            raise TypeError(f"mats[{i}] is on {W.device} but mats[0] is on {mats[0].device}")
    return mats


def _check_iter_args(iters, tol) -> float:
    check_positive_int(iters, "iters")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"tol must be a non-negative number, got {tol!r}")
    return float(tol)


def inverse_scales(mats: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(n,)`` fp32 powers of two ``2^-e_i`` with ``2^e_i <= max|W_i| < 2^(e_i + 1)`` (``e_i`` clamped to
    ``[-125, 126]`` so both ``2^e`` and ``2^-e`` are normal fp32 numbers); 1 for a zero or non-finite matrix.

    One ``_foreach_norm(inf)`` per dtype (a single multi-tensor launch on CUDA) and a few ops on ``(n,)``.
    """
    dev = mats[0].device
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, W in enumerate(mats):
        by_dtype.setdefault(W.dtype, []).append(i)
    parts, order = [], []
    for idx in by_dtype.values():
        norms = torch._foreach_norm([mats[i] for i in idx], float("inf"))
        parts.append(torch.stack(norms).to(torch.float32))
        order.extend(idx)
    amax = parts[0] if len(parts) == 1 else torch.cat(parts)
    if len(parts) > 1:
        inverse = [0] * len(order)
        for pos, i in enumerate(order):
            inverse[i] = pos
        amax = amax[torch.tensor(inverse, dtype=torch.int64).to(dev)]
    _, exponent = torch.frexp(amax)  # amax = m 2^exponent, m in [0.5, 1): 2^(exponent - 1) <= amax
    inv = torch.ldexp(torch.ones_like(amax), (1 - exponent).clamp(-126, 125))
    return torch.where((amax > 0) & (amax <= torch.finfo(torch.float32).max), inv, 1.0)


def _vector_lengths(mats: Sequence[torch.Tensor]) -> list[int]:
    return [min(W.shape) for W in mats]


def initial_vectors(mats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Deterministic cold-start vectors: flat fp32 buffer of unit Gaussian vectors (seed 0), one per matrix."""
    lengths = _vector_lengths(mats)
    gen = torch.Generator(device=mats[0].device)
    gen.manual_seed(0)
    v = torch.randn(sum(lengths), generator=gen, device=mats[0].device, dtype=torch.float32)
    return torch.cat([seg / seg.norm() for seg in v.split(lengths)])


# --------------------------------------------------------------------------------------------- reference
def _oriented(W: torch.Tensor) -> torch.Tensor:
    return W if W.shape[0] >= W.shape[1] else W.t()


def spectral_norm_ref(mats: Sequence[torch.Tensor], iters: int = DEFAULT_ITERS, tol: float = DEFAULT_TOL,
                      vectors: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Looped PyTorch power iteration, the oracle of the kernel (same update, same stopping rule, same scaling).

    Args:
        mats: list of 2-D tensors ``W_i (m_i, n_i)``.
        vectors: flat fp32 ``(sum_i min(m_i, n_i),)`` start vectors (default :func:`initial_vectors`).

    Returns:
        ``sigma (n,)`` fp32, ``fro_sq (n,)`` fp32 (``||W_i||_F^2``), final ``vectors`` (a new flat buffer).
        Matrix ``i`` stops once ``|s_k - s_{k-1}| <= tol * s_k`` for ``s = sigma^2``.
    """
    if vectors is None:
        vectors = initial_vectors(mats)
    inv = inverse_scales(mats)
    sigma, fro_sq, out_v = _power_iteration_ref(mats, iters, tol, vectors, inv)
    return sigma / inv, fro_sq / inv / inv, out_v


def _power_iteration_ref(mats, iters, tol, vectors, inv) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`spectral_norm_ref` on ``inv[i] * mats[i]`` (results of the scaled matrices)."""
    out_v = vectors.clone()
    sigma = torch.zeros(len(mats), dtype=torch.float32, device=vectors.device)
    fro_sq = torch.zeros_like(sigma)
    for i, (W, v) in enumerate(zip(mats, out_v.split(_vector_lengths(mats)), strict=True)):
        A = _oriented(W).float() * inv[i]
        fro_sq[i] = torch.linalg.vector_norm(A).square()  # no squared copy of A
        s_prev = None
        for _ in range(iters):
            z = A.t() @ (A @ v)
            s = z.norm()
            # torch.where instead of `if` keeps the loop free of host syncs (a fair GPU baseline). A zero,
            # Inf or NaN z keeps the old v, so one bad step does not poison a warm-start state.
            keep_old = ~((s > 0) & torch.isfinite(s))
            v.copy_(torch.where(keep_old, v, z / s.clamp_min(torch.finfo(s.dtype).tiny)))
            sigma[i] = s.sqrt()
            if tol > 0 and s_prev is not None and (s - s_prev).abs() <= tol * s:
                break
            s_prev = s
    return sigma, fro_sq, out_v


# ------------------------------------------------------------------------------------ custom op + dispatch
@torch.library.custom_op("lowrank_kernels::power_iteration", mutates_args=("vectors",))
def _power_iteration_op(mats: list[torch.Tensor], vectors: torch.Tensor, inv_scale: torch.Tensor, iters: int,
                        tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``sigma`` and ``fro_sq`` of the scaled matrices ``inv_scale[i] * mats[i]``."""
    if backend.choose(*mats, op="spectral_norm") == "triton":
        from ..kernels.power_iteration import power_iteration_triton

        return power_iteration_triton(mats, vectors, iters, tol, inv_scale=inv_scale)
    sigma, fro_sq, new_v = _power_iteration_ref(mats, iters, tol, vectors, inv_scale)
    vectors.copy_(new_v)
    return sigma, fro_sq


@_power_iteration_op.register_fake
def _(mats, vectors, inv_scale, iters, tol):
    n = len(mats)
    return vectors.new_empty(n), vectors.new_empty(n)


def spectral_stats(mats: Sequence[torch.Tensor], iters: int = DEFAULT_ITERS, tol: float = DEFAULT_TOL,
                   state: PowerIterationState | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sigma_max (n,), ||W||_F^2 (n,))``, both fp32, from one batched power iteration over ``mats``.

    Args:
        mats: list of 2-D tensors of any shapes and float dtypes, all on one device. Not differentiated.
        iters: most iterations per matrix (``>= 1``); with a warm ``state`` 1 per training step suffices.
        tol: a matrix stops once ``sigma^2`` changes by at most ``tol`` relative between iterations
            (0: always run ``iters``).
        state: warm-start vectors, read and updated in place (see :class:`PowerIterationState`).

    Power iteration converges like ``(sigma_2 / sigma_1)^(2k)``: matrices with a clustered top of the
    spectrum (random Gaussian ones) need many iterations or a warm start. Inputs are not checked for NaN
    (that would cost a pass); a NaN matrix yields NaN for that matrix only. Matrices are scaled by powers of
    two while iterating (see the module docstring): ``sigma_max`` is finite for any finite fp32 input;
    ``||W||_F^2`` is ``inf`` when it exceeds fp32's range.
    """
    sigma, fro_sq, inv = _scaled_stats(mats, iters, tol, state)
    return sigma / inv, fro_sq / inv / inv


def _scaled_stats(mats, iters, tol, state) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sigma, fro_sq)`` of the matrices scaled by ``inv`` (:func:`inverse_scales`), and ``inv``."""
    mats = _check_mats(mats)
    tol = _check_iter_args(iters, tol)
    vectors = state.get(mats) if state is not None else None
    vectors = initial_vectors(mats) if vectors is None else vectors.clone()
    with torch.no_grad():
        mats = [W.detach() for W in mats]
        inv = inverse_scales(mats)
        sigma, fro_sq = _power_iteration_op(mats, vectors, inv, iters, tol)
    if state is not None:
        state.put(mats, vectors)
    return sigma, fro_sq, inv


def spectral_norm(mats: Sequence[torch.Tensor], iters: int = DEFAULT_ITERS, tol: float = DEFAULT_TOL,
                  state: PowerIterationState | None = None) -> torch.Tensor:
    """``sigma_max (n,)`` fp32 of each ``W_i`` in ``mats`` (batched power iteration; see :func:`spectral_stats`)."""
    return spectral_stats(mats, iters, tol, state)[0]


def _stable_rank(fro_sq: torch.Tensor, sigma_sq: torch.Tensor) -> torch.Tensor:
    # A zero matrix has no spectrum; its stable rank is defined as 0 (not NaN) so controllers can shrink it.
    # A NaN sigma (non-finite input) stays NaN, so callers can name the matrix.
    return torch.where(sigma_sq == 0, 0.0, fro_sq / sigma_sq)


def stable_rank(mats: Sequence[torch.Tensor], iters: int = DEFAULT_ITERS, tol: float = DEFAULT_TOL,
                state: PowerIterationState | None = None) -> torch.Tensor:
    """Stable rank ``||W_i||_F^2 / sigma_max(W_i)^2`` as ``(n,)`` fp32, from the same pass as ``sigma_max``.

    Lies in ``[1, rank(W)]``; a zero matrix gets 0. An under-converged ``sigma_max`` makes it too large.
    Formed from the scaled matrices, so it is finite for any finite fp32 input (even where ``||W||_F^2`` is not).
    """
    sigma, fro_sq, _ = _scaled_stats(mats, iters, tol, state)
    return _stable_rank(fro_sq, sigma.square())


# -------------------------------------------------------------------------------------------- factored
def _factored_pairs(U, V) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], tuple[int, ...]]:
    """Normalise ``(U, V)`` to a list of 2-D pairs and the output shape."""
    if isinstance(U, torch.Tensor) != isinstance(V, torch.Tensor):
        raise TypeError("U and V must both be tensors or both be lists of tensors")
    if isinstance(U, torch.Tensor):
        check_tensor(U, "U")
        check_tensor(V, "V")
        if U.dim() not in (2, 3) or V.dim() != U.dim():
            raise ValueError(f"U and V must both be 2-D or both 3-D, got {tuple(U.shape)} and {tuple(V.shape)}")
        if U.dim() == 3 and U.shape[0] != V.shape[0]:
            raise ValueError(f"batch sizes differ: U {tuple(U.shape)}, V {tuple(V.shape)}")
        if U.dim() == 3 and U.shape[0] == 0:
            raise ValueError(f"U and V hold no pair: U {tuple(U.shape)}, V {tuple(V.shape)}")
        out_shape = () if U.dim() == 2 else (U.shape[0],)
        Us = [U] if U.dim() == 2 else list(U.unbind(0))
        Vs = [V] if V.dim() == 2 else list(V.unbind(0))
    else:
        Us, Vs = as_list(U, "U"), as_list(V, "V")
        if len(Us) != len(Vs):
            raise ValueError(f"got {len(Us)} U factors but {len(Vs)} V factors")
        out_shape = (len(Us),)
    for i, (u, v) in enumerate(zip(Us, Vs, strict=True)):
        check_tensor(u, f"U[{i}]", ndim=2)
        check_tensor(v, f"V[{i}]", ndim=2)
        if u.shape[1] != v.shape[0]:
            raise ValueError(f"pair {i}: U has shape {tuple(u.shape)} (out, r) but V has {tuple(v.shape)} (r, in)")
        if 0 in u.shape or 0 in v.shape:
            raise ValueError(f"pair {i}: U {tuple(u.shape)} (out, r) and V {tuple(v.shape)} (r, in) must have "
                             f"out, r and in >= 1 (a rank-0 factorisation has no spectrum)")
        if u.device != Us[0].device or v.device != Us[0].device:
            raise TypeError(f"pair {i} is on {u.device}/{v.device} but U[0] is on {Us[0].device}")
    return list(zip(Us, Vs, strict=True)), out_shape


_PAD_CACHE: dict[tuple, torch.Tensor] = {}
_PAD_CACHE_SIZE = 64


def _cached(key: tuple, make) -> torch.Tensor:
    """A small constant tensor (zero slice, gather index) made once per key: no fill or host-to-device copy
    per call. Never written to."""
    t = _PAD_CACHE.get(key)
    if t is None:
        t = make()
        if len(_PAD_CACHE) >= _PAD_CACHE_SIZE:
            _PAD_CACHE.pop(next(iter(_PAD_CACHE)))
        _PAD_CACHE[key] = t
    return t


def _stack_padded64(ts: list[torch.Tensor], dim: int, width: int) -> torch.Tensor:
    """``ts`` as fp64, stacked on a new leading axis, each zero-padded along ``dim`` (its rank axis) to ``width``.

    Two ops for any number of tensors: ``stack`` + cast when every rank is ``width``, else one ``cat`` (with an
    fp64 zero slice appended, which also does the cast) and one ``index_select`` that places each tensor's
    slices and the zero slice; both constants are cached by layout.
    """
    if all(t.shape[dim] == width for t in ts):
        return torch.stack(ts).double()
    t0 = ts[0]
    zero_shape = list(t0.shape)
    zero_shape[dim] = 1
    dev = t0.device
    zero = _cached(("zero", str(dev), tuple(zero_shape)),
                   lambda: torch.zeros(zero_shape, dtype=torch.float64, device=dev))
    ranks = tuple(t.shape[dim] for t in ts)

    def index() -> torch.Tensor:
        idx, start, pad = [], 0, sum(ranks)
        for r in ranks:
            idx.extend(range(start, start + r))
            idx.extend([pad] * (width - r))
            start += r
        return torch.tensor(idx, dtype=torch.int64).to(dev)

    flat = torch.cat([*ts, zero], dim=dim)  # fp64 (type promotion); rank axis: sum(r_i) + 1 (the zero slice)
    picked = flat.index_select(dim, _cached(("index", str(dev), ranks, width), index))
    if dim == 1:  # (out, n * width) -> (n, out, width)
        return picked.unflatten(1, (len(ts), width)).movedim(1, 0)
    return picked.unflatten(0, (len(ts), width))  # (n * width, in) -> (n, width, in)


def _factored_cores(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, list[int]]:
    """fp64 symmetric PSD cores ``C_i (n, k, k)`` with ``eig(C_i) = sigma(U_i V_i)^2`` (zero padded), and the
    order of the pairs along the batch axis.

    Pairs are grouped by ``(out, in, dtype, device)``; per group a fixed number of batched ops: the factors
    stacked (ranks zero-padded to the group's largest, which adds only zero singular values), ``U = Q R``
    (R only), ``G = V V^T`` and ``C = R G R^T``, since ``U V V^T U^T = Q C Q^T``. ``R`` stands in for a square
    root of ``U^T U`` with no eigendecomposition and no host sync, also when ``U`` is rank deficient. The
    groups' cores are zero-padded to one size and concatenated, so one batched eigensolver serves all pairs.
    """
    groups: dict[tuple, list[int]] = {}
    for i, (u, v) in enumerate(pairs):
        groups.setdefault((u.shape[0], v.shape[1], u.dtype, u.device), []).append(i)
    cores, order = [], []
    for idx in groups.values():
        width = max(pairs[i][0].shape[1] for i in idx)
        us = _stack_padded64([pairs[i][0].detach() for i in idx], 1, width)  # (g, out, w)
        vs = _stack_padded64([pairs[i][1].detach() for i in idx], 0, width)  # (g, w, in)
        r_u = torch.linalg.qr(us, mode="r").R  # (g, min(out, w), w)
        cores.append(torch.bmm(torch.bmm(r_u, torch.bmm(vs, vs.mT)), r_u.mT))
        order.extend(idx)
    k = max(c.shape[-1] for c in cores)
    cores = [c if c.shape[-1] == k else torch.nn.functional.pad(c, (0, k - c.shape[-1], 0, k - c.shape[-1]))
             for c in cores]
    return (cores[0] if len(cores) == 1 else torch.cat(cores)), order


def _factored_stats(U, V) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """``sigma_max^2`` and ``||U V||_F^2`` (fp64, in the pairs' order) from the cores of
    :func:`_factored_cores`, with one batched ``eigvalsh`` for all pairs (no other host sync).

    A pair with a NaN or Inf factor gets NaN for both (its core is zeroed before the eigensolver, which
    would otherwise fail for the whole batch).
    """
    pairs, out_shape = _factored_pairs(U, V)
    core, order = _factored_cores(pairs)
    total = core.flatten(1).sum(dim=1)
    finite = (total - total) == 0  # False where the core holds NaN or Inf (their sum is NaN or Inf)
    core = torch.nan_to_num(core, nan=0.0, posinf=0.0, neginf=0.0)  # only the flagged cores change
    # (n, 2): sigma_max^2 (the largest eigenvalue) and ||U V||_F^2 (the trace); NaN where a factor is not finite
    stats = torch.stack([torch.linalg.eigvalsh(core)[:, -1], core.diagonal(dim1=-2, dim2=-1).sum(-1)], dim=1)
    stats = torch.where(finite[:, None], stats.clamp_min(0), float("nan"))
    if order != sorted(order):
        inverse = [0] * len(order)
        for pos, i in enumerate(order):
            inverse[i] = pos
        stats = stats[torch.tensor(inverse, dtype=torch.int64).to(core.device)]
    return stats[:, 0], stats[:, 1], out_shape


def spectral_norm_factored(U, V) -> torch.Tensor:
    """Exact ``sigma_max(U V)`` without forming ``U V`` (see :func:`_factored_cores`; NaN for a pair with a NaN or
    Inf factor; ``ValueError`` for an empty factor, ``r = 0`` included).

    Args:
        U: ``(out, r)``, ``(b, out, r)``, or a list of ``(out_i, r_i)``.
        V: ``(r, in)``, ``(b, r, in)``, or a list of ``(r_i, in_i)`` matching ``U``.

    Returns:
        fp32 tensor of shape ``()``, ``(b,)`` or ``(n,)``. Exact up to rounding of the fp64 Gram matrices.
    """
    sigma_sq, _, shape = _factored_stats(U, V)
    return sigma_sq.sqrt().float().reshape(shape)


def stable_rank_factored(U, V) -> torch.Tensor:
    """``||U V||_F^2 / sigma_max(U V)^2`` exactly from the ``r x r`` core (0 when ``U V`` is zero); shapes as
    :func:`spectral_norm_factored`."""
    sigma_sq, fro_sq, shape = _factored_stats(U, V)
    return _stable_rank(fro_sq, sigma_sq).float().reshape(shape)
