"""Triton kernel of ``ops.q3r_apply``: Adam(W) + the decoupled Q3R step in one pass over the parameter.

Per tile of ``p (M, N)`` it reads ``p, grad, exp_avg, exp_avg_sq`` once, updates the moments, and adds the
Q3R term ``2 lmbda (p + A B)`` whose low-rank part ``A B`` is recomputed in registers from the thin factors
(``A (M, K)``, ``B (K, N)``, packed block-diagonally over the row slices, so a row tile only loops over the
``[kbeg, kend)`` columns of the slices it touches). Nothing of size ``M x N`` is materialised besides the
outputs. No autograd, no dispatch: see ``ops/q3r_apply.py``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tile ``pid`` of a row-major grid of ``(BLOCK_M, BLOCK_N)`` tiles over ``(M, N)``: its row-block index,
    its rows and columns, and which of them are inside the matrix."""
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // n_tiles_n
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % n_tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_m, rows, cols, rows < M, cols < N


@triton.jit
def _q3r_apply_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, a_ptr, b_ptr, rs_ptr, kbeg_ptr, kend_ptr,
    M, N, stride_am, stride_bk,
    beta1, beta2, eps, step_size, inv_sqrt_bc2, neg_c, row_scale,
    HAS_Q3R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    pid_m, rows, cols, rmask, cmask = _tile(pid, M, N, BLOCK_M, BLOCK_N)
    mask = rmask[:, None] & cmask[None, :]
    offs = rows[:, None] * N + cols[None, :]

    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    adam = m / (tl.sqrt(v) * inv_sqrt_bc2 + eps)

    if HAS_Q3R:
        # per-row factor 1 - lr*wd (- 2*lmbda*lr on rows covered by a slice), then - 2*lmbda*lr * A B
        rs = tl.load(rs_ptr + rows, mask=rmask, other=1.0)
        new_p = p * rs[:, None] - step_size * adam
        kbeg = tl.load(kbeg_ptr + pid_m)
        kend = tl.load(kend_ptr + pid_m)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(kbeg, kend, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < kend
            a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :], mask=rmask[:, None] & kmask[None, :],
                        other=0.0)
            b = tl.load(b_ptr + ks[:, None] * stride_bk + cols[None, :], mask=kmask[:, None] & cmask[None, :],
                        other=0.0)
            acc += tl.dot(a, b, input_precision="ieee")
        new_p += neg_c * acc
    else:
        new_p = p * row_scale - step_size * adam

    tl.store(p_ptr + offs, new_p.to(p_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)


def _blocks(M: int, N: int, has_q3r: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) by shape; no autotune so the interpreter can run it."""
    if not has_q3r:
        return 1, min(2048, triton.next_power_of_2(max(N, 16))), 16, 4
    # 64x64 fp32 tiles: 4 streams in, 3 out, plus a 64x32 + 32x64 factor slab per K step
    return 64, min(64, max(16, triton.next_power_of_2(N))), 32, 4


def q3r_apply_triton(p, grad, exp_avg, exp_avg_sq, A, B, row_scale, kbeg, kend, *, beta1: float,
                     beta2: float, eps: float, step_size: float, inv_sqrt_bc2: float, neg_c: float,
                     scalar_row_scale: float, block_m: int | None = None) -> None:
    """Launch on 2-D contiguous ``p, grad, exp_avg, exp_avg_sq (M, N)``, all updated in place but ``grad``.

    ``A (M, K)`` fp32, ``B (K, N)`` fp32, ``row_scale (M,)`` fp32 and ``kbeg, kend`` (int32, one per row block of
    ``block_m`` rows) describe the Q3R term; pass ``A=None`` for plain AdamW (then ``scalar_row_scale``).
    """
    M, N = p.shape
    has_q3r = A is not None
    BM, BN, BK, warps = _blocks(M, N, has_q3r)
    if block_m is not None and has_q3r:
        BM = block_m
    if not has_q3r:
        A = B = row_scale = kbeg = kend = p  # never read
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    _q3r_apply_kernel[grid](
        p, grad, exp_avg, exp_avg_sq, A, B, row_scale, kbeg, kend,
        M, N, A.stride(0) if has_q3r else 0, B.stride(0) if has_q3r else 0,
        beta1, beta2, eps, step_size, inv_sqrt_bc2, neg_c, scalar_row_scale,
        HAS_Q3R=has_q3r, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, num_warps=warps,
    )


def row_block(M: int, N: int) -> int:
    """The BLOCK_M the launcher uses for a Q3R tensor, so the host can build ``kbeg/kend`` per row block."""
    return _blocks(M, N, True)[0]


# ------------------------------------------------------------------------------ the Q3R term over an operator stack
@triton.jit
def _q3r_stack_kernel(
    tab_ptr, keep_ptr, M, N, K2, beta_m1, alpha,
    DTYPE: tl.constexpr, HAS_K: tl.constexpr, HAS_KEEP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # program (tile, member j): X_j <- X_j + keep ((beta - 1) X_j + alpha AT_j^T B_j). The member's addresses
    # come from its row of the table (as torch's multi-tensor kernels take lists of pointers): X_j (M, N) with
    # its own strides, AT_j (K2, M) and B_j (K2, N) contiguous fp32.
    pid = tl.program_id(0)
    row = tab_ptr + 5 * tl.program_id(1).to(tl.int64)
    pid_m, rows, cols, rmask, cmask = _tile(pid, M, N, BLOCK_M, BLOCK_N)
    mask = rmask[:, None] & cmask[None, :]
    x_base = tl.load(row).to(tl.pointer_type(DTYPE))
    offs = rows[:, None].to(tl.int64) * tl.load(row + 1) + cols[None, :].to(tl.int64) * tl.load(row + 2)
    x = tl.load(x_base + offs, mask=mask, other=0.0).to(tl.float32)
    delta = beta_m1 * x
    if HAS_K:
        at_base = tl.load(row + 3).to(tl.pointer_type(tl.float32))
        b_base = tl.load(row + 4).to(tl.pointer_type(tl.float32))
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K2, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K2
            a = tl.load(at_base + ks[None, :] * M + rows[:, None], mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(b_base + ks[:, None] * N + cols[None, :], mask=kmask[:, None] & cmask[None, :], other=0.0)
            acc += tl.dot(a, b, input_precision="ieee")
        delta += alpha * acc
    if HAS_KEEP:
        delta *= tl.load(keep_ptr)
    tl.store(x_base + offs, (x + delta).to(DTYPE), mask=mask)


_TL_DTYPES = {"torch.float32": tl.float32, "torch.float16": tl.float16, "torch.bfloat16": tl.bfloat16}


def q3r_stack_triton(table, dtype, M: int, N: int, K2: int, keep, *, beta_m1: float, alpha: float) -> None:
    """Launch once for a stack of ``b = table.shape[0]`` weights ``X_j (M, N)`` of ``dtype`` (fp32/fp16/bf16),
    updated in place: ``X_j += keep ((beta - 1) X_j + alpha AT_j^T B_j)``, computed in fp32.

    ``table (b, 5)`` int64 on the device: per member the address of ``X_j``, its row and column strides (in
    elements), the addresses of ``AT_j (K2, M)`` and ``B_j (K2, N)`` (contiguous fp32; unused when ``K2 = 0``).
    ``keep``: a 0-d fp32 tensor on the device (0 leaves the weights unchanged; read by the kernel) or None.
    """
    BM, BN = 64, min(64, max(16, triton.next_power_of_2(N)))
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN), table.shape[0])
    _q3r_stack_kernel[grid](
        table, keep if keep is not None else table, M, N, K2, beta_m1, alpha,
        DTYPE=_TL_DTYPES[str(dtype)], HAS_K=K2 > 0, HAS_KEEP=keep is not None,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=16, num_warps=4,
    )
