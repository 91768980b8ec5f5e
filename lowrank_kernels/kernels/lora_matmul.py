"""Triton kernel of ``lora_matmul``: one GEMM whose K loop also carries the LoRA term.

``y = x W^T + scaling (x A^T) B^T + bias`` is a single GEMM over the concatenated reduction axis
``[x | scaling t] @ [W | B]^T`` with ``t = x A^T`` (K grows by r). Two ways to get ``t``:

* ``fuse_t=True``: every program computes its ``(BLOCK_M, BLOCK_R)`` slice of ``t`` on chip in the same
  K loop as ``x W^T`` (the ``x`` tile is loaded once and feeds both dots), then adds ``scaling t B^T``
  to the accumulator before the epilogue. ``t`` never travels through memory; the programs of column
  block 0 write it out once because the backward needs it (``dB = scaling dy^T t``). The price is that
  every column block recomputes ``t``: ``r / BLOCK_N`` extra MMA work, small for small r.
* ``fuse_t=False`` (large r): ``t = x A^T`` is one thin cuBLAS/CPU matmul (memory bound: it reads ``x``
  once) and the GEMM kernel streams ``(t, B)`` chunks after ``(x, W)`` as extra K steps.

The same kernel computes the input gradient of the backward, ``dx = dy W + scaling (dy B) A``, by
passing strided views (``W -> W^T``, ``A -> B^T``, ``B -> A^T``); then ``t`` is ``u = dy B``.

Only kernels and host launchers live here: no autograd, no dispatch (see ``ops/lora_matmul.py``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..backend import interpreter_enabled

# Largest padded rank that is fused into the K loop. Above it the (BLOCK_M, BLOCK_R) fp32 accumulator
# costs as many registers as a second output tile and the recompute is >= 50% of a 128-wide N block.
# A heuristic from register budgets, not yet measured on a GPU.
FUSE_T_MAX_RANK = 32
# Chunk of r streamed per extra K step on the unfused path.
R_CHUNK = 64


@triton.jit
def _lora_gemm_kernel(
    x_ptr, w_ptr, a_ptr, b_ptr, bias_ptr, t_ptr, y_ptr,
    M, N, K, R, M_BUCKET,  # M_BUCKET: autotune key only (next power of two of M), unused in the body
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_tm, stride_tr, stride_ym, stride_yn,
    scaling,
    HAS_BIAS: tl.constexpr, FUSE_T: tl.constexpr, STORE_T: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # Grouped ordering: GROUP_M row blocks share the W column blocks while they are in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_in_group = GROUP_M * num_pid_n
    group_id = pid // num_in_group
    first_m = group_id * GROUP_M
    group_size = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % num_in_group) % group_size)
    pid_n = (pid % num_in_group) // group_size

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_n = offs_n < N

    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn  # (BLOCK_K, BLOCK_N) of W^T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FUSE_T:
        mask_r = offs_r < R
        a_ptrs = a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar  # (BLOCK_K, BLOCK_R) of A^T
        t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)

    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        xk = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        wk = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        acc = tl.dot(xk, wk, acc, input_precision=INPUT_PRECISION)
        if FUSE_T:
            ak = tl.load(a_ptrs, mask=(offs_k[:, None] < k_left) & mask_r[None, :], other=0.0)
            t = tl.dot(xk, ak, t, input_precision=INPUT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # The LoRA steps of the reduction: acc += (scaling t) B^T, in the operand dtype like any K step.
    if FUSE_T:
        t_lo = t.to(y_ptr.dtype.element_ty)
        if STORE_T:
            if pid_n == 0:
                t_ptrs = t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr
                tl.store(t_ptrs, t_lo, mask=mask_m[:, None] & mask_r[None, :])
        ts = (t * scaling).to(y_ptr.dtype.element_ty)
        b_ptrs = b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn  # (BLOCK_R, BLOCK_N) of B^T
        bk = tl.load(b_ptrs, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(ts, bk, acc, input_precision=INPUT_PRECISION)
    else:
        t_ptrs = t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr
        b_ptrs = b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn
        for r in range(0, tl.cdiv(R, BLOCK_R)):
            r_left = R - r * BLOCK_R
            tk = tl.load(t_ptrs, mask=mask_m[:, None] & (offs_r[None, :] < r_left), other=0.0)
            tk = (tk.to(tl.float32) * scaling).to(y_ptr.dtype.element_ty)
            bk = tl.load(b_ptrs, mask=(offs_r[:, None] < r_left) & mask_n[None, :], other=0.0)
            acc = tl.dot(tk, bk, acc, input_precision=INPUT_PRECISION)
            t_ptrs += BLOCK_R * stride_tr
            b_ptrs += BLOCK_R * stride_br

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


# Problems with at least this much GEMM work (M * N * K) are autotuned on the GPU; smaller ones take the
# heuristic config (every config is one more compile). 2**32 ~ M=4096, in=out=1024.
AUTOTUNE_MIN_WORK = 2**32
# Shared memory the pipelined stages may take (H100: 227 KiB per block), with headroom.
_SMEM_BUDGET = 200 * 1024
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): the usual Hopper/Ampere GEMM tiles; 128x256x64 with
# 3 stages and 8 warps is the Triton tutorial's best large bf16 config. Kept short: 4 compiles per variant.
_GPU_CONFIGS = [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4)]


def _fits(block_m, block_n, block_k, block_r, num_warps, num_stages, elem, fuse_t) -> bool:
    stage = (block_m * block_k + block_k * block_n + (block_k * block_r if fuse_t else 0)) * elem
    acc_regs = block_m * (block_n + (block_r if fuse_t else 0)) // (32 * num_warps)  # fp32 accumulators
    return stage * num_stages <= _SMEM_BUDGET and acc_regs <= 160


def _prune(configs, named_args, **kwargs):
    elem = named_args["x_ptr"].element_size()
    kept = [c for c in configs
            if _fits(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], kwargs["BLOCK_R"], c.num_warps,
                     c.num_stages, elem, kwargs["FUSE_T"])]
    return kept or configs[-1:]


@functools.cache
def _autotuned():
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=st)
               for bm, bn, bk, w, st in _GPU_CONFIGS]
    # every launch rewrites all of y (and t): no reset needed between tuning runs
    return triton.autotune(configs=configs, key=["M_BUCKET", "N", "K", "R"],
                           prune_configs_by={"early_config_prune": _prune})(_lora_gemm_kernel)


def _config(M: int, N: int, K: int, dtype: torch.dtype, block_r: int, fuse_t: bool) -> dict:
    """Block sizes by heuristic, for the interpreter and for GPU problems below ``AUTOTUNE_MIN_WORK``."""
    if interpreter_enabled():
        # Few, mid-size programs keep the interpreter fast; 32 still leaves tests with several tiles.
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    if dtype == torch.float32:  # tiles of 4-byte elements: half the K depth to fit the stages in shared memory
        return dict(BLOCK_M=128, BLOCK_N=128 if N >= 128 else 64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)
    if M >= 1024 and N >= 1024:
        # 3 x (128x64 + 64x256) x 2 B = 144 KiB of stages; the fused t adds (128, BLOCK_R) fp32 registers.
        return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64 if M <= 64 else 128, BLOCK_N=128 if N >= 128 else 64, BLOCK_K=64, GROUP_M=8,
                num_warps=4, num_stages=4)


def _input_precision(dtype: torch.dtype) -> str:
    # Follow torch's own fp32 matmul setting so that both backends answer the same question.
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def lora_gemm(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
              bias: torch.Tensor | None = None, *, fuse_t: bool | None = None,
              store_t: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch ``y = x w^T + scaling (x a^T) b^T + bias`` as one GEMM; any strides.

    Args:
        x: ``(M, K)``; w: ``(N, K)``; a: ``(R, K)``; b: ``(N, R)``; bias: ``(N,)`` or None; all one dtype
            and device (checked by the caller).
        fuse_t: compute ``t = x a^T`` inside the K loop (default: when ``R <= FUSE_T_MAX_RANK``), else by
            one thin matmul before the kernel.
        store_t: return ``t`` (``(M, R)``, dtype of x), e.g. for the backward.

    Returns:
        ``(y (M, N) contiguous, t or None)``.
    """
    M, K = x.shape
    N, R = b.shape
    if fuse_t is None:
        fuse_t = R <= FUSE_T_MAX_RANK
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if fuse_t:
        block_r = _pow2_at_least_16(R)
        t = torch.empty((M, R), device=x.device, dtype=x.dtype) if store_t else None
    else:
        block_r = min(R_CHUNK, _pow2_at_least_16(R))
        t = x @ a.t()
    if M == 0 or N == 0:
        return y, t
    t_arg = t if t is not None else y  # never read or written when not stored
    args = (
        x, w, a, b, bias if bias is not None else y, t_arg, y,
        M, N, K, R, triton.next_power_of_2(M),
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        t_arg.stride(0), t_arg.stride(1), y.stride(0), y.stride(1),
        float(scaling),
    )
    meta = dict(HAS_BIAS=bias is not None, FUSE_T=fuse_t, STORE_T=t is not None, BLOCK_R=block_r,
                INPUT_PRECISION=_input_precision(x.dtype))
    use_autotune = (x.device.type == "cuda" and not interpreter_enabled() and x.dtype != torch.float32
                    and M * N * K >= AUTOTUNE_MIN_WORK)
    if use_autotune:
        _autotuned()[lambda c: (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"]),)](*args, **meta)
    else:
        cfg = _config(M, N, K, x.dtype, block_r, fuse_t)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        _lora_gemm_kernel[grid](*args, **meta, **cfg)
    return y, t
