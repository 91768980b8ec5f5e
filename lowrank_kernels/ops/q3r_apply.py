"""``ops.q3r_apply``: one AdamW step plus the decoupled Q3R step, in place.

For a weight ``p (M, N)`` with task gradient ``grad`` and Adam moments ``exp_avg, exp_avg_sq``::

    m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
    p <- p - lr (m / bc1) / (sqrt(v / bc2) + eps) - lr wd p - lr G(p)

with ``G(p)[s:e] = 2 lmbda (p[s:e] + A B)`` for every factor ``(s, e, A, B)`` (rows outside every factor
get no Q3R term), all evaluated at the old ``p``. ``A (e - s, K)``, ``B (K, N)`` are the thin factors of the
Q3R operator (``Q3R.factors()``); ``A = B = None`` means the operator keeps no triplet (plain decay).

The Triton kernel (``kernels/q3r_apply.py``) reads and writes every element once and recomputes ``A B``
tile by tile; the reference below is the CPU path and the oracle. The op mutates its inputs and is called
from an optimizer under ``no_grad``, so it has no autograd and is not a ``torch.library`` custom op.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from .. import backend
from .._checks import check_tensor
from .pad_slices import normalize_slices

Factor = tuple[int, int, torch.Tensor | None, torch.Tensor | None]


def _check(p, grad, exp_avg, exp_avg_sq, factors, step, lr, betas, eps, weight_decay, lmbda) -> list[Factor]:
    for name, t in (("p", p), ("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        check_tensor(t, name)
        if t.shape != p.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, p has {tuple(p.shape)}")
        if t.device != p.device:
            raise TypeError(f"{name} is on {t.device} but p is on {p.device}")
        if t.dtype != p.dtype:
            raise TypeError(f"q3r_apply: {name} has dtype {t.dtype} but p has {p.dtype}: p, grad, exp_avg and "
                            f"exp_avg_sq must share one dtype (the optimizer state is kept in the parameter's dtype)")
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an int >= 1, got {step!r}")
    b1, b2 = betas
    for name, val, lo, hi in (("lr", lr, 0.0, math.inf), ("betas[0]", b1, 0.0, 1.0), ("betas[1]", b2, 0.0, 1.0),
                              ("eps", eps, 0.0, math.inf), ("weight_decay", weight_decay, 0.0, math.inf),
                              ("lmbda", lmbda, 0.0, math.inf)):
        if not (isinstance(val, (int, float)) and lo <= val and (val < hi or hi == math.inf) and math.isfinite(val)):
            raise ValueError(f"{name} must be a finite number in [{lo}, {hi}), got {val!r}")
    factors = list(factors)
    if not factors:
        return []
    if p.dim() != 2:
        raise ValueError(f"Q3R factors need a 2-D weight, p has shape {tuple(p.shape)}")
    M, N = p.shape
    slices = normalize_slices([f[:2] for f in factors], M)
    out = []
    for i, ((s, e), (_, _, A, B)) in enumerate(zip(slices, factors, strict=True)):
        if (A is None) != (B is None):
            raise ValueError(f"factor {i}: A and B must both be tensors or both None")
        if A is not None:
            check_tensor(A, f"factors[{i}].A", ndim=2)
            check_tensor(B, f"factors[{i}].B", ndim=2)
            if A.shape[0] != e - s or B.shape != (A.shape[1], N):
                raise ValueError(f"factor {i} (rows {s}:{e}): A {tuple(A.shape)} and B {tuple(B.shape)} do not "
                                 f"fit ({e - s}, K) x (K, {N})")
            if A.device != p.device or B.device != p.device:
                raise TypeError(f"factor {i} is on {A.device}/{B.device} but p is on {p.device}")
            if A.dtype != B.dtype:
                raise TypeError(f"factor {i} (rows {s}:{e}): A has dtype {A.dtype} but B has {B.dtype}; they must "
                                f"match (any float dtype: the term is computed in fp32, or fp64 for fp64 factors)")
        out.append((s, e, A, B))
    return out


def q3r_apply_ref(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                  factors: Sequence[Factor], *, step: int, lr: float, beta1: float, beta2: float, eps: float,
                  weight_decay: float, lmbda: float, fused: bool = True) -> None:
    """PyTorch reference of :func:`q3r_apply` (arguments already checked).

    ``fused`` (default): on the CPU, the Adam part goes through torch's fused CPU AdamW kernel (the one of
    ``torch.optim.AdamW(fused=True)``: one pass over memory instead of ~8, about 3x faster on the CPU) when the
    four tensors are contiguous fp32/fp64 of one dtype; ``False`` is the eager oracle.

    fp16/bf16 tensors are computed in fp32 and stored back in their dtype, as the Triton kernel does (in
    their own precision ``eps = 1e-8`` rounds to 0 in fp16 and an underflowed ``v`` divides by zero).
    """
    if p.dtype in (torch.float16, torch.bfloat16):
        wide = [t.float() for t in (p, grad, exp_avg, exp_avg_sq)]
        q3r_apply_ref(*wide, factors, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                      weight_decay=weight_decay, lmbda=lmbda, fused=fused)
        for t, w in zip((p, exp_avg, exp_avg_sq), (wide[0], wide[2], wide[3]), strict=True):
            t.copy_(w)
        return
    bc1, bc2 = 1.0 - beta1 ** step, 1.0 - beta2 ** step
    c = 2.0 * lmbda * lr
    base = 1.0 - lr * weight_decay
    fused = fused and _can_fuse_adam(p, grad, exp_avg, exp_avg_sq)
    if not fused:
        exp_avg.lerp_(grad, 1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = (exp_avg_sq.sqrt() / math.sqrt(bc2)).add_(eps)
    covered = 0
    for s, e, A, B in factors:
        rows = p[s:e]
        covered += e - s
        if A is None:
            rows.mul_(base - c)
        elif A.dtype == p.dtype and B.dtype == p.dtype:
            rows.addmm_(A, B, beta=base - c, alpha=-c)  # scales the rows in the same pass
        else:  # factors of another precision: their product in the wider of the two, added in p's dtype
            wide = torch.promote_types(A.dtype, p.dtype)
            rows.mul_(base - c).add_((A.to(wide) @ B.to(wide)).to(p.dtype), alpha=-c)
    if base != 1.0 and covered < (p.shape[0] if factors else 1):
        if factors:
            mask = torch.ones(p.shape[0], dtype=torch.bool, device=p.device)
            for s, e, _, _ in factors:
                mask[s:e] = False
            p[mask] *= base
        else:
            p.mul_(base)
    if fused:
        # the decay and the Q3R term are already in p (evaluated at the old p, as above); the kernel adds
        # the moments' update and p -= lr m_hat / (sqrt(v_hat) + eps)
        torch._fused_adamw_([p], [grad], [exp_avg], [exp_avg_sq], [], [torch.tensor(float(step))], lr=lr,
                            beta1=beta1, beta2=beta2, weight_decay=0.0, eps=eps, amsgrad=False, maximize=False)
    else:
        p.addcdiv_(exp_avg, denom, value=-lr / bc1)


def _can_fuse_adam(*tensors: torch.Tensor) -> bool:
    """Contiguous CPU tensors of one fp32/fp64 dtype, and a torch that has the fused AdamW kernel."""
    dtype = tensors[0].dtype
    return (hasattr(torch, "_fused_adamw_") and dtype in (torch.float32, torch.float64)
            and all(t.device.type == "cpu" and t.is_contiguous() and t.dtype == dtype for t in tensors))


def _pack(factors: list[Factor], M: int, N: int, block_m: int, base: float, c: float, device):
    """Block-diagonal ``A (M, K)``, stacked ``B (K, N)``, per-row scale, and each row block's K range."""
    factors = sorted(factors, key=lambda f: f[0])
    ks = [0 if A is None else A.shape[1] for _, _, A, _ in factors]
    K = max(1, sum(ks))
    A_full = torch.zeros(M, K, dtype=torch.float32, device=device)
    B_full = torch.zeros(K, N, dtype=torch.float32, device=device)
    row_scale = torch.full((M,), base, dtype=torch.float32, device=device)
    spans, off = [], 0
    for (s, e, A, B), k in zip(factors, ks, strict=True):
        row_scale[s:e] = base - c
        if k:
            A_full[s:e, off:off + k] = A
            B_full[off:off + k] = B
            spans.append((s, e, off, off + k))
        off += k
    return (A_full, B_full, row_scale, *_k_ranges(tuple(spans), M, block_m, device))


@functools.lru_cache(maxsize=256)
def _k_ranges(spans: tuple, M: int, block_m: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``[kbeg, kend)`` of each row block; cached because the spans only change when Q3R rebuilds, and
    building them costs a host-to-device copy."""
    n_blocks = -(-M // block_m)
    kbeg, kend = [0] * n_blocks, [0] * n_blocks
    for b in range(n_blocks):
        lo, hi = b * block_m, min(M, (b + 1) * block_m)
        hits = [(k0, k1) for s, e, k0, k1 in spans if s < hi and e > lo]
        if hits:  # slices are sorted, so the hit K ranges are adjacent
            kbeg[b], kend[b] = hits[0][0], hits[-1][1]
    as_t = lambda x: torch.tensor(x, dtype=torch.int32, device=device)
    return as_t(kbeg), as_t(kend)


def q3r_apply(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
              factors: Sequence[Factor] = (), *, step: int, lr: float, betas: tuple[float, float] = (0.9, 0.999),
              eps: float = 1e-8, weight_decay: float = 0.0, lmbda: float = 0.0) -> None:
    """AdamW + decoupled Q3R step on ``p``, in place (``p``, ``exp_avg``, ``exp_avg_sq`` are updated).

    Args:
        p, grad, exp_avg, exp_avg_sq: same shape and device; any float dtype (the Triton kernel computes
            in fp32 and needs them contiguous, else the reference runs).
        factors: ``[(start, stop, A (stop - start, K), B (K, N)), ...]`` non-overlapping row slices of a
            2-D ``p (M, N)``; ``A = B = None`` for an operator without kept triplets. Empty: plain AdamW.
        step: the Adam step count after this update (>= 1), for the bias corrections.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``; lmbda: the Q3R strength.
    """
    factors = _check(p, grad, exp_avg, exp_avg_sq, factors, step, lr, betas, eps, weight_decay, lmbda)
    b1, b2 = float(betas[0]), float(betas[1])
    tensors = (p, grad, exp_avg, exp_avg_sq)
    contiguous = all(t.is_contiguous() for t in tensors)
    # the interpreter rounds fp32 -> bf16 towards zero (not to nearest): bf16 CPU tensors take the reference
    interpreted_bf16 = p.device.type == "cpu" and p.dtype in backend.INTERPRETER_WRONG_DTYPES
    if (backend.choose(*tensors, op="q3r_apply") == "torch" or not contiguous or p.numel() == 0
            or interpreted_bf16):
        q3r_apply_ref(p, grad, exp_avg, exp_avg_sq, factors, step=step, lr=lr, beta1=b1, beta2=b2, eps=eps,
                      weight_decay=weight_decay, lmbda=lmbda)
        return
    from ..kernels.q3r_apply import q3r_apply_triton, row_block

    bc1, bc2 = 1.0 - b1 ** step, 1.0 - b2 ** step
    c, base = 2.0 * lmbda * lr, 1.0 - lr * weight_decay
    kw = dict(beta1=b1, beta2=b2, eps=eps, step_size=lr / bc1, inv_sqrt_bc2=1.0 / math.sqrt(bc2), neg_c=-c,
              scalar_row_scale=base)
    if factors:
        M, N = p.shape
        bm = row_block(M, N)
        packed = _pack(factors, M, N, bm, base, c, p.device)
        q3r_apply_triton(p, grad, exp_avg, exp_avg_sq, *packed, block_m=bm, **kw)
    else:
        flat = [t.view(1, -1) for t in tensors]
        q3r_apply_triton(*flat, None, None, None, None, None, **kw)


# ------------------------------------------------------------------------------ the Q3R term over an operator stack
def q3r_stack_step_(views: Sequence[torch.Tensor], X: torch.Tensor, AT: torch.Tensor | None, B: torch.Tensor | None,
                    *, beta: float, alpha: float, keep: torch.Tensor | None = None,
                    table: torch.Tensor | None = None) -> None:
    """``views[j] <- views[j] + keep ((beta - 1) X[j] + alpha AT[j]^T B[j])``, in place, for a stack of ``b``
    same-shape weights (the Q3R step of an operator stack, see ``q3r/operator.py``).

    Args:
        views: ``b`` tensors ``(m, n)`` of one dtype and device (row slices of weights, possibly transposed
            views), updated in place; ``X (b, m, n)``: a copy of them in the compute dtype (fp32, or fp64 for
            fp64 weights), used as workspace by the reference (its contents are destroyed).
        AT (b, K2, m), B (b, K2, n): the thin factors of the low-rank part (contiguous, compute dtype); both
            ``None`` when the stack keeps no triplet.
        beta, alpha: the step's scalars; keep: ``None`` or a 0-d fp32 tensor on the device, 1 to apply the step
            and 0 to leave ``views`` unchanged (the decision stays on the device: no host sync).
        table: ``(b, 5)`` int64 per member ``[address of views[j], row stride, column stride, address of AT[j],
            address of B[j]]`` (:meth:`_OpStack.table`), for the Triton kernel.

    One fixed set of launches for the whole stack: the Triton kernel once (reads and writes each weight once,
    ``AT^T B`` recomputed tile by tile) where :func:`backend.choose` picks Triton and the weights are
    fp32/fp16/bf16 (with an fp32 compute dtype); else one batched product on ``X``, the mask and one
    multi-tensor add. Both compute in the compute dtype and store in the weights' dtype.
    """
    dtype = views[0].dtype
    if (table is not None and X.dtype == torch.float32 and dtype in (torch.float32, torch.float16, torch.bfloat16)
            and not (X.device.type == "cpu" and dtype in backend.INTERPRETER_WRONG_DTYPES)  # rounds towards 0
            and backend.choose(X, op="q3r_apply") == "triton"):
        from ..kernels.q3r_apply import q3r_stack_triton

        _, m, n = X.shape
        q3r_stack_triton(table, dtype, m, n, 0 if AT is None else AT.shape[1], keep, beta_m1=beta - 1.0,
                         alpha=alpha)
        return
    if AT is None:
        X.mul_(beta - 1.0)
    else:
        X.baddbmm_(AT.transpose(1, 2), B, beta=beta - 1.0, alpha=alpha)
    if keep is not None:
        X.mul_(keep)
    torch._foreach_add_(list(views), list(X.unbind(0)))
