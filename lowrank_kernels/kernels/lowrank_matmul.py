"""Triton kernels for ``y = (x V^T) U^T + bias`` and its backward.

Both directions are one "chain" GEMM ``out = (a @ B1) @ B2`` over a block of ``BLOCK_M`` rows of ``a``:
phase 1 loops over ``K`` building ``mid = a_blk @ B1`` (``BLOCK_M x r``, fp32, in registers); phase 2
loops over ``N`` writing ``mid @ B2 (+ bias)``. ``mid`` never goes to memory on its way to ``out``.

* forward: ``a = x``, ``B1 = V^T``, ``B2 = U^T``; ``mid = t = x V^T`` is also stored (the backward
  needs it for ``dU``; saving ``M x r`` is far cheaper than re-reading ``x``).
* backward: ``a = dy``, ``B1 = U``, ``B2 = V``; ``mid = s = dy U``, ``out = dx``, and the same pass
  over ``dy`` writes per-block column sums of ``dy`` (summed on the host into ``dbias``), so ``dy`` is
  read once for ``dy U``, ``dx`` and ``dbias``. With ``FUSE_GRADS`` (small ``r``) the pass also adds
  each block's ``dy_blk^T t_blk`` into ``dU`` (phase 1) and ``s_blk^T x_blk`` into ``dV`` (phase 2)
  with fp32 atomics, so the whole backward reads ``dy`` and ``x`` once; the atomics move
  ``2 r / BLOCK_M`` times the bytes of ``dy``, which only pays for small ``r`` (else cuBLAS does
  ``dU``/``dV`` and ``dy`` is read a second time).

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
    a_ptr, b1_ptr, b2_ptr, bias_ptr, out_ptr, mid_ptr, colsum_ptr, t_ptr, x_ptr, g1_ptr, g2_ptr,
    M, K, R, N, M_BUCKET,  # M_BUCKET: autotune key only (next power of two of M), unused in the body
    stride_am, stride_ak,
    stride_b1k, stride_b1r,
    stride_b2r, stride_b2n,
    stride_om, stride_on,
    stride_midm, stride_midr,
    stride_tm, stride_tr,
    stride_xm, stride_xn,
    HAS_BIAS: tl.constexpr, WRITE_OUT: tl.constexpr, WRITE_MID: tl.constexpr, COLSUM: tl.constexpr,
    PRECISION: tl.constexpr, FUSE_GRADS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # row offsets times strides can pass 2**31
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R

    if FUSE_GRADS:  # backward: g1 = dU (K, R) += dy_blk^T t_blk, g2 = dV (R, N) += s_blk^T x_blk (fp32)
        t_blk = tl.load(t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr,
                        mask=mask_m[:, None] & mask_r[None, :], other=0.0)
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
        if FUSE_GRADS:
            g1 = tl.dot(tl.trans(a), t_blk, input_precision=PRECISION)
            tl.atomic_add(g1_ptr + offs_k[:, None] * R + offs_r[None, :], g1, mask=mask_k[:, None] & mask_r[None, :],
                          sem="relaxed")

    # Round the intermediate to the input dtype, as the two-GEMM reference does (and tensor cores want).
    mid = acc.to(mid_ptr.dtype.element_ty)
    if WRITE_MID:
        tl.store(mid_ptr + offs_m[:, None] * stride_midm + offs_r[None, :] * stride_midr, mid,
                 mask=mask_m[:, None] & mask_r[None, :])
    if WRITE_OUT or FUSE_GRADS:  # dV needs this loop even when dx is not wanted (frozen input)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            if WRITE_OUT:
                b2 = tl.load(b2_ptr + offs_r[:, None] * stride_b2r + offs_n[None, :] * stride_b2n,
                             mask=mask_r[:, None] & mask_n[None, :], other=0.0)
                o = tl.dot(mid, b2, input_precision=PRECISION)
                if HAS_BIAS:
                    o += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
                tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
                         o.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
            if FUSE_GRADS:
                x_blk = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_n[None, :] * stride_xn,
                                mask=mask_m[:, None] & mask_n[None, :], other=0.0)
                g2 = tl.dot(tl.trans(mid), x_blk, input_precision=PRECISION)
                tl.atomic_add(g2_ptr + offs_r[:, None] * N + offs_n[None, :], g2,
                              mask=mask_r[:, None] & mask_n[None, :], sem="relaxed")


# Shared memory of the pipelined tiles must fit (H100: 227 KiB per block); keep headroom.
_SMEM_BUDGET = 160 * 1024
# Problems at least this large (M * (K + N) elements) are autotuned on the GPU; smaller ones use the
# heuristic config, which keeps compile time low (every config is a separate compile).
_AUTOTUNE_MIN_WORK = 2**25


def _fits(block_m, block_k, block_n, block_r, num_warps, num_stages, elem) -> bool:
    phase1 = (block_m * block_k + block_k * block_r) * elem * num_stages
    phase2 = block_r * block_n * elem * num_stages
    # the fp32 (BLOCK_M, BLOCK_R) accumulator: <= 64 registers per thread. Triton sometimes keeps both
    # loops' buffers live at once (seen in sm_90 AOT compiles), hence the bound on the sum as well.
    regs = block_m * block_r // (32 * num_warps)
    return max(phase1, phase2) <= _SMEM_BUDGET and phase1 + phase2 <= 220 * 1024 and regs <= 64


# (BLOCK_M, BLOCK_K, BLOCK_N, num_warps, num_stages). BLOCK_M trades occupancy (more programs) against
# re-reading U and V from L2 (each program streams all of them: L2 traffic / HBM traffic = r / BLOCK_M).
_GPU_CONFIGS = [
    (128, 64, 64, 8, 3), (128, 64, 128, 8, 3), (128, 32, 128, 8, 4), (128, 128, 64, 8, 3),
    (64, 64, 128, 4, 3), (64, 64, 64, 4, 4), (64, 128, 64, 4, 3), (64, 64, 128, 8, 4),
    (32, 128, 128, 4, 3), (32, 64, 128, 4, 4),
    (64, 32, 64, 8, 3), (32, 64, 64, 4, 3),  # the ones that fit r = 256
]


def _prune(configs, named_args, **kwargs):
    block_r = kwargs["BLOCK_R"]
    elem = named_args["a_ptr"].element_size()
    # fused gradients: the atomics per program are amortised over BLOCK_M rows, so keep BLOCK_M large
    min_bm = 64 if kwargs["FUSE_GRADS"] else 0
    kept = [c for c in configs if c.kwargs["BLOCK_M"] >= min_bm
            and _fits(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.kwargs["BLOCK_N"], block_r, c.num_warps,
                      c.num_stages, elem)]
    if kept:
        return kept
    bm = _MIN_BLOCK_M
    warps = 8 if bm * block_r > 4096 else 4
    tiles = _stream_tiles(bm, block_r, warps, elem)
    stages = tiles.pop("num_stages")
    return [triton.Config({"BLOCK_M": bm, **tiles}, num_warps=warps, num_stages=stages)]


@functools.cache
def _autotuned():
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_N": bn}, num_warps=w, num_stages=s)
               for bm, bk, bn, w, s in _GPU_CONFIGS]
    # colsum rows depend on BLOCK_M and g1/g2 accumulate: all are zeroed before each tuning run
    return triton.autotune(configs=configs, key=["M_BUCKET", "K", "N", "BLOCK_R", "FUSE_GRADS"],
                           reset_to_zero=["colsum_ptr", "g1_ptr", "g2_ptr"],
                           prune_configs_by={"early_config_prune": _prune})(_chain_matmul_kernel)


_MIN_BLOCK_M = min(c[0] for c in _GPU_CONFIGS)


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _heuristic(m: int, block_r: int, elem: int, device: torch.device, min_block_m: int = 32) -> dict:
    """Config for small problems and the interpreter: the largest BLOCK_M whose grid still fills the SMs,
    then the largest streaming tiles that fit in shared memory."""
    if device.type != "cuda":  # interpreter: few programs, yet awkward M still hits the row mask
        return dict(BLOCK_M=16 if m <= 16 else 32, BLOCK_K=32, BLOCK_N=32, num_warps=4, num_stages=1)
    n_sm = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    bm = max(min_block_m, min(128, 8192 // block_r))
    while bm > min_block_m and triton.cdiv(m, bm) < n_sm:
        bm //= 2
    warps = 8 if bm * block_r > 4096 else 4
    return dict(BLOCK_M=bm, **_stream_tiles(bm, block_r, warps, elem), num_warps=warps)


def _stream_tiles(block_m: int, block_r: int, warps: int, elem: int) -> dict:
    """The largest (BLOCK_K, BLOCK_N, stages) that fit shared memory for this BLOCK_M and r."""
    for bk, bn, stages in ((64, 64, 3), (32, 64, 3), (32, 32, 2), (16, 16, 2)):
        if _fits(block_m, bk, bn, block_r, warps, stages, elem):
            break
    return dict(BLOCK_K=bk, BLOCK_N=bn, num_stages=stages)


def _precision(dtype: torch.dtype) -> str:
    # fp32 follows torch.matmul's TF32 switch so both paths round alike; for fp16/bf16 "tf32" is
    # Triton's default and means plain tensor-core MMA.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _use_autotune(a: torch.Tensor, n: int) -> bool:
    return a.device.type == "cuda" and not interpreter_enabled() and a.shape[0] * (a.shape[1] + n) >= _AUTOTUNE_MIN_WORK


#: Largest r for which the backward fuses dU / dV into the dy pass (atomics cost 2 r / BLOCK_M of dy's
#: bytes, reading dy again costs 1): with BLOCK_M >= 64 that is at most half a re-read at r = 16.
FUSE_GRADS_MAX_RANK = 16


def _launch(a, b1, b2, bias, out, mid, config, colsum=None, t=None, x=None, g1=None, g2=None, **flags):
    m, k = a.shape
    r = b1.shape[1]
    n = b2.shape[1]
    fuse = g1 is not None
    dummy = mid  # never dereferenced when the matching flag is off (and always fully rewritten)
    args = (a, b1, b2, *(dummy if v is None else v for v in (bias, out)), mid,
            *(dummy if v is None else v for v in (colsum, t, x, g1, g2)),
            m, k, r, n, triton.next_power_of_2(m),
            a.stride(0), a.stride(1), b1.stride(0), b1.stride(1), b2.stride(0), b2.stride(1),
            *(out.stride() if out is not None else (0, 0)), mid.stride(0), mid.stride(1),
            *(t.stride() if fuse else (0, 0)), *(x.stride() if fuse else (0, 0)))
    meta = dict(HAS_BIAS=bias is not None, WRITE_OUT=out is not None, COLSUM=colsum is not None,
                PRECISION=_precision(a.dtype), FUSE_GRADS=fuse, BLOCK_R=_block_r(r), **flags)
    if config is None:
        kernel = _autotuned()
        kernel[lambda c: (triton.cdiv(m, c["BLOCK_M"]),)](*args, **meta)
    else:
        _chain_matmul_kernel[(triton.cdiv(m, config["BLOCK_M"]),)](*args, **meta, **config)


def _plan(a: torch.Tensor, r: int, n: int, fuse: bool = False) -> tuple[dict | None, int]:
    """(heuristic config or None for autotune, rows of the dbias partial-sum buffer)."""
    m = a.shape[0]
    if _use_autotune(a, n):
        return None, triton.cdiv(m, _MIN_BLOCK_M)
    # fused gradients: the atomics of each program are amortised over BLOCK_M rows
    config = _heuristic(m, _block_r(r), a.element_size(), a.device, min_block_m=64 if fuse else 32)
    return config, triton.cdiv(m, config["BLOCK_M"])


def lowrank_matmul_forward(x: torch.Tensor, U: torch.Tensor, V: torch.Tensor,
                           bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (M, in)`` any strides, ``U (out, r)``, ``V (r, in)``, ``bias (out,)`` or None, one dtype.

    Returns ``y (M, out)`` contiguous and ``t = x V^T (M, r)`` (rounded to the input dtype).
    """
    m, r = x.shape[0], V.shape[0]
    y = torch.empty(m, U.shape[0], device=x.device, dtype=x.dtype)
    t = torch.empty(m, r, device=x.device, dtype=x.dtype)
    config, _ = _plan(x, r, U.shape[0])
    _launch(x, V.t(), U.t(), bias, y, t, config, WRITE_MID=True)
    return y, t


def lowrank_matmul_backward(dy: torch.Tensor, x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, t: torch.Tensor, *,
                            need_dx: bool = True, need_dbias: bool = True,
                            fuse_grads: bool | None = None) -> tuple[torch.Tensor, ...]:
    """One pass over ``dy (M, out)`` (and, when fused, ``x (M, in)``); ``t = x V^T (M, r)`` from the forward.

    Returns ``(s, dx, dbias, dU, dV)``: ``s = dy U (M, r)``; ``dx = s V (M, in)`` or None;
    ``dbias = dy.sum(0) (out,)`` or None (summed in fp32); ``dU = dy^T t (out, r)`` and
    ``dV = s^T x (r, in)`` when the gradients were fused (fp32 atomics, cast to the input dtype), else
    None (the caller computes them with two GEMMs). ``fuse_grads=None`` fuses when
    ``r <= FUSE_GRADS_MAX_RANK``.
    """
    m, n_out = dy.shape
    r = U.shape[1]
    fuse = r <= FUSE_GRADS_MAX_RANK if fuse_grads is None else fuse_grads
    dev, dt = dy.device, dy.dtype
    s = torch.empty(m, r, device=dev, dtype=dt)
    dx = torch.empty(m, V.shape[1], device=dev, dtype=dt) if need_dx else None
    config, rows = _plan(dy, r, V.shape[1], fuse)
    # autotuned launches may leave rows unwritten (larger BLOCK_M): they must read as zero
    alloc = torch.empty if config is not None else torch.zeros
    colsum = alloc(rows, n_out, device=dev, dtype=torch.float32) if need_dbias else None
    g1 = torch.zeros(n_out, r, device=dev, dtype=torch.float32) if fuse else None
    g2 = torch.zeros(r, V.shape[1], device=dev, dtype=torch.float32) if fuse else None
    _launch(dy, U, V, None, dx, s, config, colsum=colsum, t=t if fuse else None, x=x if fuse else None,
            g1=g1, g2=g2, WRITE_MID=True)
    dbias = colsum.sum(0).to(dt) if need_dbias else None
    return s, dx, dbias, (g1.to(dt) if fuse else None), (g2.to(dt) if fuse else None)
