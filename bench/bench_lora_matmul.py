"""Benchmark ``ops.lora_matmul``: ``y = x W^T + bias + scaling (x A^T) B^T`` with a frozen ``W``.

Providers: ``torch`` (eager ``lora_matmul_ref``: base GEMM + two thin matmuls + add), ``torch_compile``
(the same reference under ``torch.compile``), ``composed`` (ours, the default: ``addmm`` then the adapter
accumulated in place by ``addmm_``, see ``ops/lora_matmul.py``), ``triton`` (ours, the single-GEMM Triton
kernel), ``peft`` (a ``peft.tuners.lora.Linear`` holding the same weights, adapters in the base dtype) and
``dense`` (``x @ W.T + bias`` alone: the floor the forward is measured against, target within 1.1x).
As in LoRA fine-tuning, ``W`` and ``bias`` are frozen: gradients flow to ``x``, ``A``, ``B``. Modes:
``forward`` (inputs require grad), ``backward`` (``torch.autograd.grad`` on a retained graph) and ``full``
(both).

Metrics: ``time`` (ms), ``memory`` (peak extra MiB, GPU only), ``launches`` and ``syncs`` (one call,
counted on any device; none for ``torch_compile``), ``tflops`` and, for ``forward``,
``bandwidth`` (GB/s over the minimal traffic: read ``x, W, A, B, bias``, write ``y`` and the ``M x r``
``t``) with ``hbm_pct``. At the full shapes the forward is compute bound, so ``tflops`` is the telling one.

Full shapes (GPU): bf16, M=8192, in=out=4096, r in {16, 64, 128}. CPU full: fp32, M=1024, in=out=1024,
r in {16, 64}, no triton (the interpreter is no timing target). Quick: GPU bf16 M=in=out=1024, r=16;
CPU fp32 M=64, in=out=96, r in {4, 40} (both ways of
forming ``t``: in the K loop, and before it), Triton interpreted, no torch.compile.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from bench.common import backend_env, make_row, mode_rows, resolve_device
from lowrank_kernels import backend
from lowrank_kernels.ops import lora_matmul, lora_matmul_ref
from lowrank_kernels.ops.lora_matmul import lora_matmul_composed

KERNEL = "lora_matmul"
SCALING = 2.0


def _peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def _shapes(quick: bool, dev: torch.device) -> tuple[list[tuple[int, int, int, int]], torch.dtype, list[str]]:
    """``[(M, in, out, r)]``, dtype, providers for this run."""
    peft = ["peft"] if _peft_available() else []
    if dev.type == "cuda":
        providers = ["dense", "torch", "torch_compile", "composed", "triton", *peft]
        if quick:
            return [(1024, 1024, 1024, 16)], torch.bfloat16, providers
        return [(8192, 4096, 4096, r) for r in (16, 64, 128)], torch.bfloat16, providers
    if quick:
        triton = ["triton"] if backend.interpreter_enabled() and backend.triton_available() else []
        return [(64, 96, 96, r) for r in (4, 40)], torch.float32, ["dense", "torch", "composed", *triton, *peft]
    return ([(1024, 1024, 1024, r) for r in (16, 64)], torch.float32,
            ["dense", "torch", "torch_compile", "composed", *peft])


def _peft_layer(W: torch.Tensor, b: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> nn.Module:
    """A ``peft.tuners.lora.Linear`` over an ``nn.Linear(W, b)`` holding ``A``, ``B`` (dtype of W)."""
    from peft import LoraConfig, get_peft_model

    out_f, in_f = W.shape
    r = A.shape[0]
    base = nn.Linear(in_f, out_f, device=W.device, dtype=W.dtype)
    with torch.no_grad():
        base.weight.copy_(W)
        base.bias.copy_(b)
    model = get_peft_model(nn.Sequential(base), LoraConfig(r=r, lora_alpha=SCALING * r, target_modules=["0"]))
    layer = model.base_model.model[0].to(W.dtype)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    return layer


@functools.cache
def _compiled_ref():
    # One compiled function for all shapes: later ranks reuse its (then dynamic) graph instead of a fresh compile.
    return torch.compile(lora_matmul_ref)


def _forward_fn(provider: str, W, b, A, B):
    """``f(x) -> y`` for one provider, plus the adapter parameters its gradients go to."""
    if provider == "dense":
        return (lambda x: torch.nn.functional.linear(x, W, b)), []
    if provider == "peft":
        layer = _peft_layer(W, b, A, B)
        return layer, [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    if provider == "torch":
        return (lambda x: lora_matmul_ref(x, W, A, B, SCALING, b)), [A, B]
    if provider == "torch_compile":
        return (lambda x: _compiled_ref()(x, W, A, B, SCALING, b)), [A, B]
    if provider == "composed":
        return (lambda x: lora_matmul_composed(x, W, A, B, SCALING, b)), [A, B]
    return (lambda x: lora_matmul(x, W, A, B, SCALING, b)), [A, B]


def _bench_shape(provider, m, k, n, r, dtype, dev, rep) -> list[dict]:
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(m, k, device=dev, dtype=dtype, generator=gen).requires_grad_(True)
    W = torch.randn(n, k, device=dev, dtype=dtype, generator=gen) / k**0.5  # frozen
    b = torch.randn(n, device=dev, dtype=dtype, generator=gen)  # frozen
    A = (torch.randn(r, k, device=dev, dtype=dtype, generator=gen) / k**0.5).requires_grad_(True)
    B = (torch.randn(n, r, device=dev, dtype=dtype, generator=gen) / r**0.5).requires_grad_(True)
    dy = torch.randn(m, n, device=dev, dtype=dtype, generator=gen)
    fn, params = _forward_fn(provider, W, b, A, B)
    inputs = [x, *params]

    def forward():
        return fn(x)

    def full():
        return torch.autograd.grad(fn(x), inputs, dy)

    y = forward()

    def backward():
        return torch.autograd.grad(y, inputs, dy, retain_graph=True)

    full()  # compile / autotune both directions before timing
    config = {"M": m, "in": k, "out": n, "dtype": str(dtype).replace("torch.", "")}
    lora = 0 if provider == "dense" else 1
    flops = {  # fwd: x W^T (+ x A^T, t B^T); bwd: dx = dy W (+ (dy B) A), dA, dB; no dW (frozen)
        "forward": 2 * m * k * n + lora * 2 * m * r * (k + n),
        "backward": 2 * m * k * n + lora * 4 * m * r * (k + n),
    }
    flops["full"] = flops["forward"] + flops["backward"]
    fwd_bytes = x.element_size() * (m * k + n * k + n + m * n + lora * (r * (k + n) + m * r))
    rows = []
    for mode, f in (("forward", forward), ("backward", backward), ("full", full)):
        timed = mode_rows(KERNEL, provider, mode, f, dev, rep, "r", r, config, fwd_bytes)
        p50, p20, p80 = (float(timed[0][q]) for q in ("p50", "p20", "p80"))
        tflops = [flops[mode] / (t * 1e-3) / 1e12 for t in (p50, p80, p20)]  # slower time = fewer TFLOP/s
        rows += timed[:1] + [make_row(KERNEL, provider, mode, "tflops", "TFLOP/s", "r", r, *tflops, config=config)]
        rows += timed[1:]
    return rows


def run(quick: bool = True, device: str | None = None, ranks: tuple[int, ...] | None = None,
        providers: tuple[str, ...] | None = None) -> list[dict]:
    """Rows for every (shape, provider, mode) of this run (see the module docstring); ``ranks`` / ``providers``
    restrict it to those of the run's shapes and providers (``.ci/gpu``'s targets need only some)."""
    dev = resolve_device(device)
    shapes, dtype, all_providers = _shapes(quick, dev)
    shapes = [s for s in shapes if ranks is None or s[3] in ranks]
    providers = [p for p in all_providers if providers is None or p in providers]
    rep = 20 if quick else 100
    rows: list[dict] = []
    # The backward mode replays one graph (retain_graph=True), which compiled backwards refuse when they
    # donate buffers; the donation saves memory, not time, so turning it off keeps the timing fair.
    with torch._functorch.config.patch(donated_buffer=False):
        for m, k, n, r in shapes:
            for provider in providers:
                with backend_env("triton" if provider == "triton" else "auto"):
                    rows += _bench_shape(provider, m, k, n, r, dtype, dev, rep)
    return rows


if __name__ == "__main__":
    from bench.common import main

    main(run)
