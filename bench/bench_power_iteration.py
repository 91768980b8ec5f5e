"""Benchmark ``ops.spectral_norm``: sigma_max of every Linear weight of a model in one call.

Providers: ``triton`` (ours, ``ops.spectral_norm`` on the Triton backend), ``torch`` (the looped PyTorch
power iteration ``spectral_norm_ref``, same iterations, no host syncs) and ``matrix_norm`` (a loop of
``torch.linalg.matrix_norm(W, ord=2)``, i.e. a full SVD per matrix; it ignores ``iters``). On a GPU the Triton
launcher is also timed with each variant forced (``config`` ``variant=fused`` / ``variant=split``) to
check its automatic choice. Mode ``forward``; ``x`` is ``iters`` (1 = the per-step cost with a warm
:class:`PowerIterationState`).
Metrics: ``time`` (ms), ``bandwidth`` / ``hbm_pct`` (weights read once per iteration), ``rel_err``
(max over matrices of ``|sigma - sigma_exact| / sigma_exact`` from a cold start with that many iterations),
and ``launches`` / ``syncs`` of one call (``lowrank_kernels.testing.count_gpu_cost``, on any device).

Full (GPU): the 72 Linear weights of a 12-layer d=768 transformer (per layer qkv 2304x768, proj 768x768,
fc1 3072x768, fc2 768x3072), fp32 and bf16. The weights are Gaussian (``1/sqrt(in)``) plus a rank-2 spike,
like trained weights with a few outlying singular values; pure Gaussian matrices have a clustered top of
the spectrum that no iteration count resolves. CPU full: 2 layers (8 matrices), fp32, torch providers.
Quick: 4 tiny matrices (CPU: Triton interpreted).
"""

from __future__ import annotations

import os
from unittest import mock

import torch

from bench.common import bandwidth_rows, cost_rows, make_row, resolve_device, time_fn
from lowrank_kernels import backend
from lowrank_kernels.ops import PowerIterationState, spectral_norm, spectral_norm_ref
from lowrank_kernels.ops.power_iteration import initial_vectors

KERNEL = "power_iteration"
LAYER_SHAPES = ((2304, 768), (768, 768), (3072, 768), (768, 3072))


def make_weights(shapes, dtype: torch.dtype, dev: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """Gaussian ``(out, in)`` weights scaled ``1/sqrt(in)`` plus a rank-2 spike (sigma ~ 8 and 5)."""
    gen = torch.Generator(device=dev).manual_seed(seed)
    mats = []
    for out_f, in_f in shapes:
        W = torch.randn(out_f, in_f, device=dev, generator=gen) / in_f**0.5
        u = torch.randn(out_f, 2, device=dev, generator=gen) / out_f**0.5
        v = torch.randn(2, in_f, device=dev, generator=gen) / in_f**0.5
        W += u @ (torch.tensor([8.0, 5.0], device=dev)[:, None] * v)
        mats.append(W.to(dtype))
    return mats


def _config(quick: bool, dev: torch.device):
    """``(shapes, dtypes, providers, iters list, label)``."""
    if quick:
        shapes = [(40, 24), (24, 72), (64, 64), (17, 5)]
        providers = ["torch", "matrix_norm"]
        if dev.type == "cuda" or (backend.interpreter_enabled() and backend.triton_available()):
            providers.insert(0, "triton")
        return shapes, [torch.float32], providers, [1, 4], "tiny4"
    if dev.type == "cuda":
        return list(LAYER_SHAPES) * 12, [torch.float32, torch.bfloat16], ["triton", "torch", "matrix_norm"], \
            [1, 5, 20], "gpt12_d768_72mats"
    return list(LAYER_SHAPES) * 2, [torch.float32], ["torch", "matrix_norm"], [1, 5, 20], "gpt2layers_d768_8mats"


def _fn(provider: str, mats, iters: int, variant: str = "auto"):
    if provider == "matrix_norm":
        return lambda: torch.stack([torch.linalg.matrix_norm(W.float(), 2) for W in mats])
    if provider == "torch":
        v0 = initial_vectors(mats)
        return lambda: spectral_norm_ref(mats, iters, 0.0, v0)[0]
    if variant != "auto":  # the launcher itself, one variant forced (GPU tuning of the auto choice)
        from lowrank_kernels.kernels.power_iteration import power_iteration_triton

        v = initial_vectors(mats)
        split = variant == "split"
        return lambda: power_iteration_triton(mats, v, iters, 0.0, split=split)[0]
    state = PowerIterationState()
    spectral_norm(mats, iters=iters, tol=0.0, state=state)  # warm the state and the table cache
    return lambda: spectral_norm(mats, iters=iters, tol=0.0, state=state)


def _cold(mats, iters: int, variant: str) -> torch.Tensor:
    from lowrank_kernels.kernels.power_iteration import power_iteration_triton

    return power_iteration_triton(mats, initial_vectors(mats), iters, 0.0, split=variant == "split")[0]


def run(quick: bool = True, device: str | None = None) -> list[dict]:
    """Rows for every (dtype, provider, iters) of this run (see the module docstring)."""
    dev = resolve_device(device)
    shapes, dtypes, providers, iters_list, label = _config(quick, dev)
    rep = 20 if quick else 200
    rows: list[dict] = []
    for dtype in dtypes:
        mats = make_weights(shapes, dtype, dev)
        exact = torch.stack([torch.linalg.matrix_norm(W.double(), 2) for W in mats])
        nbytes = sum(W.numel() * W.element_size() for W in mats)
        base_config = {"mats": label, "n": len(mats), "dtype": str(dtype).replace("torch.", "")}
        runs = [(p, "auto") for p in providers]
        if "triton" in providers and dev.type == "cuda":
            runs += [("triton", "fused"), ("triton", "split")]
        for provider, variant in runs:
            config = {**base_config, "variant": variant} if variant != "auto" else base_config
            with mock.patch.dict(os.environ, {backend.ENV_VAR: "triton" if provider == "triton" else "torch"}):
                cached = None
                for iters in iters_list:
                    fn = _fn(provider, mats, iters, variant)
                    if provider != "matrix_norm" or cached is None:  # matrix_norm ignores iters: time it once
                        cached = time_fn(fn, dev, warmup=rep / 4, rep=rep)
                    p50, p20, p80 = cached
                    rows.append(make_row(KERNEL, provider, "forward", "time", "ms", "iters", iters, p50, p20, p80,
                                         config))
                    rows += cost_rows(KERNEL, provider, "forward", fn, "iters", iters, config)
                    if provider == "matrix_norm" or variant != "auto":
                        sigma = fn() if provider == "matrix_norm" else _cold(mats, iters, variant)
                    else:
                        sigma = spectral_norm(mats, iters=iters, tol=0.0)  # cold start: the honest error
                    err = float(((sigma.double() - exact) / exact).abs().max())
                    rows.append(make_row(KERNEL, provider, "forward", "rel_err", "rel", "iters", iters, err,
                                         config=config))
                    if provider != "matrix_norm":
                        rows += bandwidth_rows(KERNEL, provider, "forward", "iters", iters, iters * nbytes, p50, p20,
                                               p80, dev, config)
    return rows


if __name__ == "__main__":
    from bench.common import main

    main(run)
