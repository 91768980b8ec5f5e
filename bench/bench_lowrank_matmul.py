"""Benchmark ``ops.lowrank_matmul``: ``y = (x V^T) U^T + bias``.

Providers: ``torch`` (eager, two matmuls = ``lowrank_matmul_ref``), ``torch_compile``
(``torch.compile`` of the same reference), ``composed`` (ours, the default: ``mm`` then ``addmm``, see
``ops/lowrank_matmul.py``) and ``triton`` (ours, forced through the Triton kernels).
On the GPU two more rows per shape (backward/full only) tell whether ``FUSE_GRADS_MAX_RANK`` is set
right: ``triton_fused_grads`` (dU/dV always fused into the dy pass with atomics) and
``triton_separate_grads`` (never fused: cuBLAS for dU/dV).
Modes: ``forward`` (inputs require grad, as in training), ``backward`` (``torch.autograd.grad`` on a
retained graph, so no ``.grad`` accumulation is timed) and ``full`` (both). Metrics: ``time`` (ms),
``memory`` (peak extra MiB, GPU only), ``launches`` and ``syncs`` (one call, counted on any device; none for
``torch_compile``) and, for ``forward``, ``bandwidth`` (GB/s over the minimal
traffic: read ``x``, ``U``, ``V``, ``bias``, write ``y`` and the ``M x r`` intermediate) and ``hbm_pct``.

Full shapes (GPU): bf16, M=8192, in=out=4096, r in {16, 64, 128}. CPU full: fp32, M=1024,
in=out=1024 (torch providers only; the Triton interpreter is not a timing target). Quick: tiny shapes
(GPU: M=1024, in=out=1024, bf16, r=16; CPU: M=64, in=out=96, fp32, r in {4, 16}, Triton interpreted,
no torch.compile so it stays within seconds).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch._functorch import config as functorch_config

from bench.common import backend_env, mode_rows, resolve_device
from lowrank_kernels import backend
from lowrank_kernels.ops import lowrank_matmul, lowrank_matmul_ref
from lowrank_kernels.ops.lowrank_matmul import lowrank_matmul_composed

KERNEL = "lowrank_matmul"


@contextlib.contextmanager
def _fuse_grads(provider: str):
    """Force the backward strategy for the ``triton_*_grads`` providers."""
    if provider not in ("triton_fused_grads", "triton_separate_grads"):
        yield
        return
    from lowrank_kernels.kernels import lowrank_matmul as kernels

    old = kernels.FUSE_GRADS_MAX_RANK
    kernels.FUSE_GRADS_MAX_RANK = 1 << 30 if provider == "triton_fused_grads" else 0
    try:
        yield
    finally:
        kernels.FUSE_GRADS_MAX_RANK = old


def _shapes(quick: bool, dev: torch.device) -> tuple[list[tuple[int, int, int, int]], torch.dtype, list[str]]:
    """``[(M, in, out, r)]``, dtype, providers for this run."""
    if dev.type == "cuda":
        providers = ["torch", "torch_compile", "composed", "triton", "triton_fused_grads", "triton_separate_grads"]
        if quick:
            return [(1024, 1024, 1024, 16)], torch.bfloat16, providers
        return [(8192, 4096, 4096, r) for r in (16, 64, 128)], torch.bfloat16, providers
    if quick:
        triton = ["triton"] if backend.interpreter_enabled() and backend.triton_available() else []
        return [(64, 96, 96, r) for r in (4, 16)], torch.float32, ["torch", "composed", *triton]
    return [(1024, 1024, 1024, r) for r in (16, 64)], torch.float32, ["torch", "torch_compile", "composed"]


def _provider_fn(provider: str):
    if provider == "torch":
        return lowrank_matmul_ref
    if provider == "torch_compile":
        return torch.compile(lowrank_matmul_ref)
    if provider == "composed":
        return lowrank_matmul_composed
    return lowrank_matmul


def _bench_shape(provider, m, k, n, r, dtype, dev, rep) -> list[dict]:
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(m, k, device=dev, dtype=dtype, generator=gen).requires_grad_(True)
    U = (torch.randn(n, r, device=dev, dtype=dtype, generator=gen) / r**0.5).requires_grad_(True)
    V = (torch.randn(r, k, device=dev, dtype=dtype, generator=gen) / k**0.5).requires_grad_(True)
    b = torch.randn(n, device=dev, dtype=dtype, generator=gen).requires_grad_(True)
    dy = torch.randn(m, n, device=dev, dtype=dtype, generator=gen)
    inputs = (x, U, V, b)
    fn = _provider_fn(provider)

    def forward():
        return fn(x, U, V, b)

    def full():
        return torch.autograd.grad(fn(x, U, V, b), inputs, dy)

    y = forward()

    def backward():
        return torch.autograd.grad(y, inputs, dy, retain_graph=True)

    full()  # compile / autotune both directions before timing
    config = {"M": m, "in": k, "out": n, "dtype": str(dtype).replace("torch.", "")}
    elem = x.element_size()
    fwd_bytes = elem * (m * k + m * n + m * r + r * (k + n) + n)
    modes = [("forward", forward), ("backward", backward), ("full", full)]
    rows = []
    for mode, f in modes[1:] if provider.endswith("_grads") else modes:
        rows += mode_rows(KERNEL, provider, mode, f, dev, rep, "r", r, config, fwd_bytes)
    return rows


def run(quick: bool = True, device: str | None = None,
        on_rows: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Rows for every (shape, provider, mode) of this run (see the module docstring); ``on_rows`` receives
    each provider's rows as soon as they are measured (the runner keeps them if a later one times out)."""
    dev = resolve_device(device)
    shapes, dtype, providers = _shapes(quick, dev)
    rep = 20 if quick else 100
    rows: list[dict] = []
    for m, k, n, r in shapes:
        for provider in providers:
            # backward mode re-runs the backward of one retained graph, which compiled graphs only allow
            # without donated buffers (they save memory, not time)
            no_donation = functorch_config.patch(donated_buffer=False)
            with backend_env("triton" if provider.startswith("triton") else "auto"), _fuse_grads(provider), no_donation:
                new = _bench_shape(provider, m, k, n, r, dtype, dev, rep)
            rows += new
            if on_rows is not None:
                on_rows(new)
    return rows


if __name__ == "__main__":
    from bench.common import main

    main(run)
