"""Triton kernels for ``y = (x V^T) U^T + bias`` and its backward.

Both directions are one "chain" GEMM ``out = (a @ B1) @ B2`` over a block of ``BLOCK_M`` rows of ``a``:
phase 1 loops over ``K`` building ``mid = a_blk @ B1`` (``BLOCK_M x r``, fp32, in registers); phase 2
loops over ``N`` writing ``mid @ B2 (+ bias)``. ``mid`` never goes to memory on its way to ``out``.

* forward: ``a = x``, ``B1 = V^T``, ``B2 = U^T``; ``mid = t = x V^T`` is also stored (the backward
  needs it for ``dU``; saving ``M x r`` is far cheaper than re-reading ``x``).
* backward: ``a = dy``, ``B1 = U``, ``B2 = V``; ``mid = dy U`` is stored (for ``dV``), ``out = dx``,
  and the same pass over ``dy`` writes per-block column sums of ``dy`` (summed on the host into
  ``dbias``), so ``dy`` is read once for ``dy U``, ``dx`` and ``dbias``.

``r`` is padded to ``BLOCK_R`` = next power of two >= 16 (``tl.dot`` needs every dim >= 16) with masks.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..backend import interpreter_enabled


@triton.jit
def _chain_matmul_kernel(
    a_ptr, b1_ptr, b2_ptr, bias_ptr, out_ptr, mid_ptr, colsum_ptr,
    M, K, R, N,
    stride_am, stride_ak,
    stride_b1k, stride_b1r,
    stride_b2r, stride_b2n,
    stride_om, stride_on,
    stride_midm, stride_midr,
    HAS_BIAS: tl.constexpr, WRITE_OUT: tl.constexpr, WRITE_MID: tl.constexpr, COLSUM: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # row offsets times strides can pass 2**31
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b1 = tl.load(b1_ptr + offs_k[:, None] * stride_b1k + offs_r[None, :] * stride_b1r,
                     mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = tl.dot(a, b1, acc, input_precision=PRECISION)
        if COLSUM:
            # masked rows load as 0, so they add nothing
            tl.store(colsum_ptr + pid * K + offs_k, tl.sum(a.to(tl.float32), axis=0), mask=mask_k)

    # Round the intermediate to the input dtype, as the two-GEMM reference does (and tensor cores want).
    mid = acc.to(mid_ptr.dtype.element_ty)
    if WRITE_MID:
        tl.store(mid_ptr + offs_m[:, None] * stride_midm + offs_r[None, :] * stride_midr, mid,
                 mask=mask_m[:, None] & mask_r[None, :])
    if WRITE_OUT:
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            b2 = tl.load(b2_ptr + offs_r[:, None] * stride_b2r + offs_n[None, :] * stride_b2n,
                         mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            o = tl.dot(mid, b2, input_precision=PRECISION)
            if HAS_BIAS:
                o += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
                     o.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# Autotuned on GPU only (the interpreter cannot run several configs). BLOCK_M is fixed by the host
# (it sizes the dbias partial-sum buffer and must not change between tuning runs), so the configs vary
# the streaming tiles and pipelining.
_GPU_CONFIGS = [
    triton.Config({"BLOCK_K": bk, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bk, bn, w, s in [(64, 128, 4, 3), (64, 64, 4, 4), (128, 128, 8, 3), (32, 128, 4, 4), (64, 128, 8, 4),
                         (128, 64, 4, 3)]
]


def _prune(configs, named_args, **kwargs):
    # Keep the shared-memory footprint of the pipelined tiles (a + B1 in phase 1, B2 in phase 2) modest.
    block_r, block_m = named_args.get("BLOCK_R", kwargs.get("BLOCK_R")), named_args.get("BLOCK_M",
                                                                                         kwargs.get("BLOCK_M"))
    kept = [c for c in configs
            if (block_m * c.kwargs["BLOCK_K"] + c.kwargs["BLOCK_K"] * block_r) * 2 * c.num_stages <= 160 * 1024
            and block_r * c.kwargs["BLOCK_N"] * 2 * c.num_stages <= 160 * 1024]
    return kept or configs[:1]


@functools.cache
def _autotuned():
    return triton.autotune(configs=_GPU_CONFIGS, key=["K", "N", "BLOCK_R", "BLOCK_M"],
                           prune_configs_by={"early_config_prune": _prune})(_chain_matmul_kernel)


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _block_m(m: int, block_r: int, device: torch.device) -> int:
    """Rows per program: as large as the fp32 ``(BLOCK_M, BLOCK_R)`` accumulator allows (fewer re-reads
    of U and V from L2), halved while the grid would leave SMs idle."""
    if device.type != "cuda":
        return 16 if m <= 16 else 32  # interpreter: few programs, yet awkward M still hits the row mask
    bm = max(16, min(128, 16384 // block_r))
    n_sm = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    while bm > 32 and triton.cdiv(m, bm) < n_sm:
        bm //= 2
    return bm


def _precision(dtype: torch.dtype) -> str:
    # fp32 follows torch.matmul's TF32 switch so both paths round alike; fp16/bf16 ignore it.
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _launch(a, b1, b2, bias, out, mid, colsum, block_m, **flags):
    m, k = a.shape
    r = b1.shape[1]
    n = b2.shape[1]
    block_r = _block_r(r)
    dummy = mid  # never dereferenced when the matching flag is off
    args = (a, b1, b2, bias if bias is not None else dummy, out if out is not None else dummy, mid,
            colsum if colsum is not None else dummy,
            m, k, r, n, a.stride(0), a.stride(1), b1.stride(0), b1.stride(1), b2.stride(0), b2.stride(1),
            out.stride(0) if out is not None else 0, out.stride(1) if out is not None else 0,
            mid.stride(0), mid.stride(1))
    meta = dict(HAS_BIAS=bias is not None, WRITE_OUT=out is not None, COLSUM=colsum is not None,
                PRECISION=_precision(a.dtype), BLOCK_M=block_m, BLOCK_R=block_r, **flags)
    grid = (triton.cdiv(m, block_m),)
    if interpreter_enabled() or a.device.type != "cuda":
        _chain_matmul_kernel[grid](*args, **meta, BLOCK_K=32, BLOCK_N=32)
    else:
        _autotuned()[grid](*args, **meta)


def lowrank_matmul_forward(x: torch.Tensor, U: torch.Tensor, V: torch.Tensor,
                           bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (M, in)`` any strides, ``U (out, r)``, ``V (r, in)``, ``bias (out,)`` or None, one dtype.

    Returns ``y (M, out)`` contiguous and ``t = x V^T (M, r)`` (rounded to the input dtype).
    """
    m, r = x.shape[0], V.shape[0]
    y = torch.empty(m, U.shape[0], device=x.device, dtype=x.dtype)
    t = torch.empty(m, r, device=x.device, dtype=x.dtype)
    block_m = _block_m(m, _block_r(r), x.device)
    _launch(x, V.t(), U.t(), bias, y, t, None, block_m, WRITE_MID=True)
    return y, t


def lowrank_matmul_backward_dx(dy: torch.Tensor, U: torch.Tensor, V: torch.Tensor, *, need_dx: bool = True,
                               need_dbias: bool = True) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                 torch.Tensor | None]:
    """One pass over ``dy (M, out)``: returns ``s = dy U (M, r)``, ``dx = s V (M, in)`` (or None) and
    ``dbias = dy.sum(0) (out,)`` (or None), all in the input dtype (dbias summed in fp32)."""
    m, n_out = dy.shape
    r = U.shape[1]
    block_m = _block_m(m, _block_r(r), dy.device)
    s = torch.empty(m, r, device=dy.device, dtype=dy.dtype)
    dx = torch.empty(m, V.shape[1], device=dy.device, dtype=dy.dtype) if need_dx else None
    colsum = torch.empty(triton.cdiv(m, block_m), n_out, device=dy.device, dtype=torch.float32) if need_dbias else None
    _launch(dy, U, V, None, dx, s, colsum, block_m, WRITE_MID=True)
    dbias = colsum.sum(0).to(dy.dtype) if need_dbias else None
    return s, dx, dbias
