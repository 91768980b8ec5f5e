"""Benchmark ``ops.truncated_svd``: top-``rank`` singular triplets by randomized subspace iteration.

Providers: ``ours`` (``truncated_svd`` with its defaults), ``torch_svd`` (``torch.linalg.svd``,
``full_matrices=False``, then truncated: exact) and ``torch_svd_lowrank`` (``torch.svd_lowrank`` with
``q = rank + 8`` and ``niter = 4``, the same work as ours). Mode ``forward``, ``x`` is ``rank``.
Metrics: ``time`` (ms) and ``rel_err`` = ``max_i |S_i - S*_i| / S*_i`` over the top ``rank`` singular values
(``S*`` from ``torch.linalg.svd`` in fp64); ``config`` names the shape and the spectrum.

Spectra: ``exp32`` (``sigma_i = exp(-i / 32)``, a smoothly decaying spectrum) and ``gauss+spike`` (a
``1/sqrt(n)`` Gaussian plus a rank-8 spike: a flat bulk, the hard case for randomized methods).
Full: CPU 768x3072 at rank 64 (the issue's target: >= 5x faster than ``torch.linalg.svd`` at rel_err
<= 1e-3 on the decaying spectrum); GPU 768x3072 and a batch of 8 of them, 4096x4096, ranks 64 and 128.
Quick: 300x520 at rank 16.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bench.common import make_row, resolve_device, time_fn
from lowrank_kernels.ops import truncated_svd

KERNEL = "truncated_svd"
PROVIDERS = ("ours", "torch_svd", "torch_svd_lowrank")


def make_matrix(shape: tuple[int, ...], spectrum: str, dev: torch.device, seed: int = 0) -> torch.Tensor:
    """fp32 ``W (..., m, n)`` with a known kind of spectrum (built in fp64 on ``dev``)."""
    *batch, m, n = shape
    gen = torch.Generator(device=dev).manual_seed(seed)
    k = min(m, n)
    if spectrum == "exp32":
        U = torch.linalg.qr(torch.randn(*batch, m, k, generator=gen, device=dev, dtype=torch.float64)).Q
        V = torch.linalg.qr(torch.randn(*batch, n, k, generator=gen, device=dev, dtype=torch.float64)).Q
        s = torch.exp(-torch.arange(k, device=dev, dtype=torch.float64) / 32)
        return ((U * s) @ V.transpose(-1, -2)).float()
    if spectrum == "gauss+spike":
        W = torch.randn(*batch, m, n, generator=gen, device=dev) / n**0.5
        u = torch.randn(*batch, m, 8, generator=gen, device=dev) / m**0.5
        v = torch.randn(*batch, 8, n, generator=gen, device=dev) / n**0.5
        return W + (u * torch.linspace(12, 4, 8, device=dev)) @ v
    raise ValueError(f"unknown spectrum {spectrum!r}")


def _config(quick: bool, dev: torch.device):
    """``[(shape, rank)]`` and spectra."""
    if quick:
        return [((300, 520), 16)], ["exp32"]
    if dev.type == "cuda":
        return [((768, 3072), 64), ((8, 768, 3072), 64), ((4096, 4096), 64), ((4096, 4096), 128)], \
            ["exp32", "gauss+spike"]
    return [((768, 3072), 64)], ["exp32", "gauss+spike"]


def _fn(provider: str, W: torch.Tensor, rank: int):
    if provider == "ours":
        return lambda: truncated_svd(W, rank)
    if provider == "torch_svd":
        def full():
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            return U[..., :rank], S[..., :rank], Vh[..., :rank, :]
        return full

    def lowrank():
        U, S, V = torch.svd_lowrank(W, q=rank + 8, niter=4)
        return U[..., :rank], S[..., :rank], V[..., :rank].transpose(-1, -2)
    return lowrank


def run(quick: bool = True, device: str | None = None,
        on_rows: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Rows for every (shape, spectrum, provider) of this run (see the module docstring); ``on_rows`` receives
    each provider's rows as soon as they are measured (the runner keeps them if a later one times out)."""
    dev = resolve_device(device)
    cases, spectra = _config(quick, dev)
    rep = 50 if quick else 2000 if dev.type == "cpu" else 200
    rows: list[dict] = []
    for shape, rank in cases:
        for spectrum in spectra:
            W = make_matrix(shape, spectrum, dev)
            exact = torch.linalg.svdvals(W.double())[..., :rank]
            config = {"shape": "x".join(map(str, shape)), "spectrum": spectrum, "dtype": "float32"}
            for provider in PROVIDERS:
                fn = _fn(provider, W, rank)
                p50, p20, p80 = time_fn(fn, dev, warmup=rep / 10, rep=rep)
                S = fn()[1].double()
                err = float(((S - exact) / exact).abs().max())
                new = [make_row(KERNEL, provider, "forward", "time", "ms", "rank", rank, p50, p20, p80, config),
                       make_row(KERNEL, provider, "forward", "rel_err", "rel", "rank", rank, err, config=config)]
                rows += new
                if on_rows is not None:
                    on_rows(new)
    return rows


if __name__ == "__main__":
    from bench.common import main

    main(run)
