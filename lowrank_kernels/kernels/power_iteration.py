"""Triton batched power iteration: ``sigma_max`` and ``||W||_F^2`` of many matrices of mixed shapes.

One launch per (dtype, memory order) group runs the whole iteration loop: one program per matrix, its
address, shape and strides read from a table, so there is never a launch per matrix. Each program walks
the row blocks ``A_b`` of its (oriented, ``N <= M``) matrix and, from the same tile, forms
``u_b = A_b v`` and accumulates ``z += A_b^T u_b``; ``sum_b A_b^T A_b v = A^T A v``, so ``A`` is read
once per iteration. The iteration matches :func:`lowrank_kernels.ops.power_iteration.spectral_norm_ref`.

A second, "split" variant balances the load when one program per matrix would leave most of the GPU
idle behind the largest matrix (72 transformer weights on 132 SMs): work items of a few hundred rows each
add their partial ``A_b^T u_b`` into ``z`` with fp32 atomics (launch 1), then one program per matrix
normalises (launch 2): two launches per iteration. :func:`power_iteration_triton` picks one by
:func:`_use_split`.

Accumulation is fp32 with elementwise products and reductions (no ``tl.dot``), so there is no TF32
rounding on the GPU and bf16 is exact under the interpreter too. Groups whose unit-stride runs are
16-byte aligned multiples load 16-byte vectors (``VEC``); every configuration the launcher can pick
compiles for sm_90 without register spills (checked offline with ptxas; the test suite compiles a few).
The choice between the fused and split variants is an estimate until timed on a GPU
(``bench/bench_power_iteration.py`` records both).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Vectors up to this length stay in registers for the whole loop (the tile is BLOCK_M x BLOCK_N with
# BLOCK_M * BLOCK_N = _TILE elements); longer ones live in an fp32 scratch buffer and are streamed.
_MAX_REG_N = 2048
_TILE = 8192
_STREAM_BLOCK_N = 512
# v is only replaced by z / ||z|| when 0 < ||z|| <= this: a zero, Inf or NaN matrix keeps its vector.
_FP32_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _load_tile(a_ptr, rows, cols, row_end, N, stride_m, stride_n, inv, CONTIG_N: tl.constexpr):
    """fp32 tile ``inv * A[rows, cols]`` (zeros outside ``rows < row_end``, ``cols < N``); ``inv`` is the
    matrix's power-of-two scale, which keeps ``sigma^4`` (the squared norm of ``A^T A v``) inside fp32.

    The unit stride is a compile-time fact (CONTIG_N), so the compiler can coalesce along that axis.
    """
    mask = (rows[:, None] < row_end) & (cols[None, :] < N)
    if CONTIG_N:
        offs = rows[:, None].to(tl.int64) * stride_m + cols[None, :]
    else:
        offs = rows[:, None] + cols[None, :].to(tl.int64) * stride_n
    return tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv


@triton.jit
def _power_iteration_kernel(
    w0_ptr, table_ptr, inv_ptr, v_ptr, z_ptr, sigma_ptr, fro_ptr, iters, tol,
    CONTIG_N: tl.constexpr, ONE_BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VEC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    # w0_ptr only carries the element type: every matrix of the group shares it. (The entry is read inline:
    # read through a helper, the alignment hints below no longer vectorise the loads, per the PTX.)
    row = table_ptr + pid * 6
    a_ptr = tl.load(row).to(w0_ptr.dtype)
    M = tl.load(row + 1)
    N = tl.load(row + 2)
    stride_m = tl.load(row + 3)
    stride_n = tl.load(row + 4)
    voff = tl.load(row + 5)
    inv = tl.load(inv_ptr + pid)
    if VEC > 1:
        # Runs along the unit-stride axis start 16-byte aligned and hold a multiple of VEC elements (checked
        # on the host): tiles then load as 16-byte vectors. Addresses read from a table carry no alignment
        # the compiler could see, and the hints must be set here (through a helper they are lost: PTX).
        a_ptr = tl.multiple_of(a_ptr, 16)
        if CONTIG_N:
            N = tl.multiple_of(N, VEC)
            stride_m = tl.multiple_of(stride_m, VEC)
        else:
            M = tl.multiple_of(M, VEC)
            stride_n = tl.multiple_of(stride_n, VEC)
    vp = v_ptr + voff
    zp = z_ptr + voff
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)

    if ONE_BLOCK_N:
        mask_n = rn < N
        v = tl.load(vp + rn, mask=mask_n, other=0.0)
    sigma = tl.zeros([], dtype=tl.float32)
    fro = tl.zeros([], dtype=tl.float32)
    s_prev = tl.zeros([], dtype=tl.float32)
    done = tl.zeros([], dtype=tl.int32)
    for it in range(iters):
        if done == 0:
            fro_rows = tl.zeros([BLOCK_M], dtype=tl.float32)
            if ONE_BLOCK_N:
                z = tl.zeros([BLOCK_N], dtype=tl.float32)
                for m0 in range(0, M, BLOCK_M):
                    rows = m0 + rm
                    a = _load_tile(a_ptr, rows, rn, M, N, stride_m, stride_n, inv, CONTIG_N)
                    u = tl.sum(a * v[None, :], axis=1)
                    z += tl.sum(a * u[:, None], axis=0)
                    fro_rows += tl.sum(a * a, axis=1)
                s = tl.sqrt(tl.sum(z * z, axis=0))
                v = tl.where((s > 0) & (s <= _FP32_MAX), z / tl.maximum(s, 1e-30), v)
            else:
                for n0 in range(0, N, BLOCK_N):
                    tl.store(zp + n0 + rn, tl.zeros([BLOCK_N], dtype=tl.float32), mask=n0 + rn < N)
                tl.debug_barrier()
                for m0 in range(0, M, BLOCK_M):
                    rows = m0 + rm
                    u = tl.zeros([BLOCK_M], dtype=tl.float32)
                    for n0 in range(0, N, BLOCK_N):
                        cols = n0 + rn
                        a = _load_tile(a_ptr, rows, cols, M, N, stride_m, stride_n, inv, CONTIG_N)
                        vb = tl.load(vp + cols, mask=cols < N, other=0.0)
                        u += tl.sum(a * vb[None, :], axis=1)
                        fro_rows += tl.sum(a * a, axis=1)
                    # Second sweep of the same row block: it was just read, so it comes from L1/L2.
                    for n0 in range(0, N, BLOCK_N):
                        cols = n0 + rn
                        a = _load_tile(a_ptr, rows, cols, M, N, stride_m, stride_n, inv, CONTIG_N)
                        zb = tl.load(zp + cols, mask=cols < N, other=0.0)
                        tl.store(zp + cols, zb + tl.sum(a * u[:, None], axis=0), mask=cols < N)
                    # The store and the next row block's load of z may map an element to different threads.
                    tl.debug_barrier()
                tl.debug_barrier()
                ss = tl.zeros([BLOCK_N], dtype=tl.float32)
                for n0 in range(0, N, BLOCK_N):
                    zb = tl.load(zp + n0 + rn, mask=n0 + rn < N, other=0.0)
                    ss += zb * zb
                s = tl.sqrt(tl.sum(ss, axis=0))
                if (s > 0) & (s <= _FP32_MAX):
                    for n0 in range(0, N, BLOCK_N):
                        zb = tl.load(zp + n0 + rn, mask=n0 + rn < N, other=0.0)
                        tl.store(vp + n0 + rn, zb / s, mask=n0 + rn < N)
                tl.debug_barrier()
            fro = tl.sum(fro_rows, axis=0)
            sigma = tl.sqrt(s)
            done = tl.where((it > 0) & (tol > 0) & (tl.abs(s - s_prev) <= tol * s), 1, done)
            s_prev = s
    if ONE_BLOCK_N:
        tl.store(vp + rn, v, mask=mask_n)
    tl.store(sigma_ptr + pid, sigma)
    tl.store(fro_ptr + pid, fro)


@triton.jit
def _power_iteration_partial_kernel(
    w0_ptr, table_ptr, inv_ptr, work_ptr, v_ptr, z_ptr, fro_ptr, done_ptr,
    CONTIG_N: tl.constexpr, ONE_BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VEC: tl.constexpr, FIRST: tl.constexpr,
):
    """Split variant, launch 1: rows ``[r0, r1)`` of matrix ``j`` add ``A_b^T A_b v`` into ``z`` (atomics)."""
    wid = tl.program_id(0).to(tl.int64)
    j = tl.load(work_ptr + wid * 3)
    r0 = tl.load(work_ptr + wid * 3 + 1)
    r1 = tl.load(work_ptr + wid * 3 + 2)
    if tl.load(done_ptr + j) == 0:
        row = table_ptr + j * 6
        a_ptr = tl.load(row).to(w0_ptr.dtype)
        N = tl.load(row + 2)
        stride_m = tl.load(row + 3)
        stride_n = tl.load(row + 4)
        voff = tl.load(row + 5)
        inv = tl.load(inv_ptr + j)
        if VEC > 1:  # see _power_iteration_kernel; items start and end on multiples of VEC rows there
            a_ptr = tl.multiple_of(a_ptr, 16)
            if CONTIG_N:
                N = tl.multiple_of(N, VEC)
                stride_m = tl.multiple_of(stride_m, VEC)
            else:
                r0 = tl.multiple_of(r0, VEC)
                r1 = tl.multiple_of(r1, VEC)
                stride_n = tl.multiple_of(stride_n, VEC)
        rm = tl.arange(0, BLOCK_M)
        rn = tl.arange(0, BLOCK_N)
        fro_rows = tl.zeros([BLOCK_M], dtype=tl.float32)
        if ONE_BLOCK_N:
            mask_n = rn < N
            v = tl.load(v_ptr + voff + rn, mask=mask_n, other=0.0)
            z = tl.zeros([BLOCK_N], dtype=tl.float32)
        for m0 in range(r0, r1, BLOCK_M):
            rows = m0 + rm
            if ONE_BLOCK_N:
                a = _load_tile(a_ptr, rows, rn, r1, N, stride_m, stride_n, inv, CONTIG_N)
                u = tl.sum(a * v[None, :], axis=1)
                z += tl.sum(a * u[:, None], axis=0)
                if FIRST:
                    fro_rows += tl.sum(a * a, axis=1)
            else:
                u = tl.zeros([BLOCK_M], dtype=tl.float32)
                for n0 in range(0, N, BLOCK_N):
                    cols = n0 + rn
                    a = _load_tile(a_ptr, rows, cols, r1, N, stride_m, stride_n, inv, CONTIG_N)
                    vb = tl.load(v_ptr + voff + cols, mask=cols < N, other=0.0)
                    u += tl.sum(a * vb[None, :], axis=1)
                    if FIRST:
                        fro_rows += tl.sum(a * a, axis=1)
                for n0 in range(0, N, BLOCK_N):
                    cols = n0 + rn
                    a = _load_tile(a_ptr, rows, cols, r1, N, stride_m, stride_n, inv, CONTIG_N)
                    tl.atomic_add(z_ptr + voff + cols, tl.sum(a * u[:, None], axis=0), mask=cols < N)
        if ONE_BLOCK_N:
            tl.atomic_add(z_ptr + voff + rn, z, mask=mask_n)
        if FIRST:
            tl.atomic_add(fro_ptr + j, tl.sum(fro_rows, axis=0))


@triton.jit
def _power_iteration_normalize_kernel(
    table_ptr, v_ptr, z_ptr, sigma_ptr, s_prev_ptr, done_ptr, it, tol, BLOCK_N: tl.constexpr,
):
    """Split variant, launch 2 (one program per matrix): ``v = z / ||z||``, ``sigma``, stop flag, ``z = 0``."""
    j = tl.program_id(0).to(tl.int64)
    if tl.load(done_ptr + j) == 0:
        N = tl.load(table_ptr + j * 6 + 2)
        voff = tl.load(table_ptr + j * 6 + 5)
        rn = tl.arange(0, BLOCK_N)
        ss = tl.zeros([BLOCK_N], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            zb = tl.load(z_ptr + voff + n0 + rn, mask=n0 + rn < N, other=0.0)
            ss += zb * zb
        s = tl.sqrt(tl.sum(ss, axis=0))
        s_row = tl.zeros([BLOCK_N], dtype=tl.float32) + s
        keep = (s_row > 0) & (s_row <= _FP32_MAX)  # a zero or non-finite z keeps the old v
        for n0 in range(0, N, BLOCK_N):
            # Same pointers as the load, so each element is re-read and zeroed by the thread that loads it.
            mask = n0 + rn < N
            zb = tl.load(z_ptr + voff + n0 + rn, mask=mask, other=0.0)
            tl.store(v_ptr + voff + n0 + rn, zb / tl.maximum(s, 1e-30), mask=mask & keep)
            tl.store(z_ptr + voff + n0 + rn, tl.zeros([BLOCK_N], dtype=tl.float32), mask=mask)
        tl.store(sigma_ptr + j, tl.sqrt(s))
        s_prev = tl.load(s_prev_ptr + j)
        stop = (it > 0) & (tol > 0) & (tl.abs(s - s_prev) <= tol * s)
        tl.store(done_ptr + j, stop.to(tl.int32))
        tl.store(s_prev_ptr + j, s)


def _oriented_meta(W: torch.Tensor) -> tuple[torch.Tensor, int, int, int, int]:
    """``(tensor, M, N, stride_m, stride_n)`` of ``A = W`` or ``W^T`` with ``N = min(m, n)``.

    A matrix with neither stride 1 is copied (contiguous) first: the kernel needs one unit stride.
    """
    if W.stride(0) != 1 and W.stride(1) != 1:
        W = W.contiguous()
    m, n = W.shape
    if m >= n:
        return W, m, n, W.stride(0), W.stride(1)
    return W, n, m, W.stride(1), W.stride(0)


def _vector_width(entries: list[tuple[int, ...]], elem_size: int, contig_n: bool, block_m: int) -> int:
    """Elements per 16-byte load when, in every matrix of the group, each run along the unit-stride axis
    starts 16-byte aligned and holds a multiple of that many elements (and, for column-major ``A``, row
    blocks hold whole vectors), else 1 (scalar loads)."""
    vec = 16 // elem_size
    if contig_n:
        ok = all(addr % 16 == 0 and N % vec == 0 and sm % vec == 0 for addr, _, N, sm, _, _ in entries)
    else:
        ok = block_m % vec == 0 and all(addr % 16 == 0 and M % vec == 0 and sn % vec == 0
                                        for addr, M, _, _, sn, _ in entries)
    return vec if ok else 1


def _blocks(n_max: int, block_n: int | None, tile: int = _TILE) -> tuple[bool, int, int]:
    if block_n is None:
        one = n_max <= _MAX_REG_N
        block_n = max(16, triton.next_power_of_2(n_max)) if one else _STREAM_BLOCK_N
    else:
        one = n_max <= block_n
    block_m = max(1, min(64, tile // block_n))
    return one, block_m, block_n


_TABLE_CACHE: dict[tuple, torch.Tensor] = {}
_TABLE_CACHE_SIZE = 64


def _table(entries: list[tuple[int, ...]], dev: torch.device) -> torch.Tensor:
    """Device copy of an int64 table: per matrix ``[address, M, N, stride_m, stride_n, vector offset]``, or
    the split variant's work items ``[matrix, first row, end row]``.

    Cached by content: a training loop passes the same parameters (same storage) every step, so after
    the first step no host-to-device copy is needed. A stale entry is harmless, the key is the content.
    """
    key = (str(dev), tuple(entries))
    table = _TABLE_CACHE.get(key)
    if table is None:
        table = torch.tensor(entries, dtype=torch.int64).to(dev)
        if len(_TABLE_CACHE) >= _TABLE_CACHE_SIZE:
            _TABLE_CACHE.pop(next(iter(_TABLE_CACHE)))
        _TABLE_CACHE[key] = table
    return table


# Auto choice of the split variant (see _use_split): it wins when the largest matrix holds more than
# _SPLIT_IMBALANCE times an even per-SM share of the work. Measured on an H100 (bench_power_iteration,
# the 72 weights of a 12-layer d=768 transformer): split 0.68 / 1.48 / 5.2 ms vs fused 1.76 / 7.9 / 30.5 ms
# at 1 / 5 / 20 iterations (bf16; fp32 alike), so two launches per iteration stay cheaper at least up to
# 20 iterations. Not timed beyond 32.
_SPLIT_MAX_ITERS = 32
_SPLIT_IMBALANCE = 2.0
_ITEMS_PER_SM = 4


def _num_sms(dev: torch.device) -> int:
    return torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 4


def _use_split(sizes: list[int], iters: int, dev: torch.device) -> bool:
    if dev.type != "cuda" or iters > _SPLIT_MAX_ITERS:
        return False
    return max(sizes) > _SPLIT_IMBALANCE * sum(sizes) / _num_sms(dev)


def _work_items(shapes: list[tuple[int, int]], block_m: int, dev: torch.device) -> list[tuple[int, int, int]]:
    """``(matrix, first row, end row)`` items of about equal size, ~_ITEMS_PER_SM per SM in all."""
    total = sum(M for M, _ in shapes)
    rows = max(block_m, triton.cdiv(triton.cdiv(total, _ITEMS_PER_SM * _num_sms(dev)), block_m) * block_m)
    return [(j, r, min(r + rows, M)) for j, (M, _) in enumerate(shapes) for r in range(0, M, rows)]


def _run_split(w0, entries, inv, vectors, iters, tol, one, block_m, bn, contig_n, vec, dev):
    n = len(entries)
    table = _table(entries, dev)
    work = _work_items([(e[1], e[2]) for e in entries], block_m, dev)
    work_t = _table(work, dev)
    z = torch.zeros_like(vectors)
    fro = torch.zeros(n, dtype=torch.float32, device=dev)
    sigma = torch.zeros(n, dtype=torch.float32, device=dev)
    s_prev = torch.zeros(n, dtype=torch.float32, device=dev)
    done = torch.zeros(n, dtype=torch.int32, device=dev)
    num_warps = 8 if bn * block_m >= 4096 else 4
    norm_bn = min(bn, 1024)
    for it in range(iters):
        _power_iteration_partial_kernel[(len(work),)](
            w0, table, inv, work_t, vectors, z, fro, done,
            CONTIG_N=contig_n, ONE_BLOCK_N=one, BLOCK_M=block_m, BLOCK_N=bn, VEC=vec, FIRST=it == 0,
            num_warps=num_warps,
        )
        _power_iteration_normalize_kernel[(n,)](table, vectors, z, sigma, s_prev, done, it, tol, BLOCK_N=norm_bn)
    return sigma, fro


def power_iteration_triton(mats: list[torch.Tensor], vectors: torch.Tensor, iters: int, tol: float,
                           block_n: int | None = None, split: bool | None = None,
                           inv_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the kernels over ``inv_scale[i] * mats[i]``; updates the flat fp32 ``vectors`` in place.

    Args:
        mats: 2-D tensors on one device (fp16/bf16/fp32/fp64; fp64 is read and accumulated in fp32).
        vectors: flat fp32 ``(sum_i min(m_i, n_i),)`` start vectors, contiguous.
        block_n: force the column block (tests use it to reach the streamed path on tiny shapes).
        split: force the split (True) or fused-loop (False) variant; ``None`` chooses by :func:`_use_split`.
        inv_scale: ``(n,)`` fp32 factor applied to each matrix as it is read (powers of two from
            :func:`lowrank_kernels.ops.power_iteration.inverse_scales`); None: 1.

    Returns:
        ``sigma (n,)`` and ``fro_sq (n,)`` of the scaled matrices, fp32.
    """
    dev = vectors.device
    if inv_scale is None:
        inv_scale = torch.ones(len(mats), dtype=torch.float32, device=dev)
    groups: dict[tuple[torch.dtype, bool], list[int]] = {}
    prepared = []
    offset = 0
    for i, W in enumerate(mats):
        W = W.float() if W.dtype == torch.float64 else W
        W, M, N, sm, sn = _oriented_meta(W)
        prepared.append((W, (W.data_ptr(), M, N, sm, sn, offset)))
        offset += N
        groups.setdefault((W.dtype, sn == 1), []).append(i)
    results = []
    scratch = None
    for (_, contig_n), idx in groups.items():
        entries = [prepared[i][1] for i in idx]
        w0 = prepared[idx[0]][0]
        g_inv = inv_scale if len(idx) == len(mats) else inv_scale.index_select(
            0, _table([(i,) for i in idx], dev).reshape(-1))
        one, block_m, bn = _blocks(max(e[2] for e in entries), block_n)
        vec = _vector_width(entries, w0.element_size(), contig_n, block_m)
        if not contig_n and vec == 1:
            # Scalar loads of a column-major tile need more registers: at 8192 elements sm_90 spills
            # (ptxas: 255 registers + 48 B stack), at 4096 it does not (167 registers).
            one, block_m, bn = _blocks(max(e[2] for e in entries), block_n, _TILE // 2)
        use_split = _use_split([e[1] * e[2] for e in entries], iters, dev) if split is None else split
        if use_split:
            g_sigma, g_fro = _run_split(w0, entries, g_inv, vectors, iters, tol, one, block_m, bn, contig_n, vec,
                                        dev)
            results.append((idx, g_sigma, g_fro))
            continue
        if not one and scratch is None:
            scratch = torch.empty_like(vectors)
        g_sigma = torch.empty(len(idx), dtype=torch.float32, device=dev)
        g_fro = torch.empty_like(g_sigma)
        _power_iteration_kernel[(len(idx),)](
            w0, _table(entries, dev), g_inv, vectors, scratch if scratch is not None else vectors, g_sigma, g_fro,
            iters, tol, CONTIG_N=contig_n, ONE_BLOCK_N=one, BLOCK_M=block_m, BLOCK_N=bn, VEC=vec,
            num_warps=8 if bn * block_m >= 4096 else 4,
        )
        results.append((idx, g_sigma, g_fro))
    if len(results) == 1:
        return results[0][1], results[0][2]
    sigma = torch.empty(len(mats), dtype=torch.float32, device=dev)
    fro_sq = torch.empty_like(sigma)
    for idx, g_sigma, g_fro in results:
        index = torch.tensor(idx, dtype=torch.int64).to(dev)
        sigma[index] = g_sigma
        fro_sq[index] = g_fro
    return sigma, fro_sq
