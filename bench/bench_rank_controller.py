"""Benchmark one ``RankController`` decision over every low-rank layer of a transformer.

Providers: ``ours`` (``RankController.step``: exact stable ranks of all layers from their ``r x r`` cores, a
fixed number of batched ops per shape group and one host read, in-place factored resize + AdamW state remap)
and ``upstream`` (the per-layer reference, the adaptive low-rank training code's approach: per layer form
``W = U V``, ``||W||_F^2`` and ``UPSTREAM_POWER_ITERS`` power iterations on ``W`` for sigma_max, one host read per
layer; on resize a full SVD of ``W`` with a sqrt split, random columns when growing, and a new AdamW). Mode
``step``; ``x`` is how many layers the decision resizes: 0 (a decision that keeps every rank, the common case)
or all of them (worst case; the resize alternates shrink r -> r - 4 and grow back, so the time mixes both).

Metrics: ``time`` (ms) and, counted on any device by ``lowrank_kernels.testing.count_gpu_cost`` (one call),
``launches`` and ``syncs``.

Full: 12 layers at d=768 with LowRankLinear ``qkv`` (768 -> 2304), ``proj`` (768 -> 768), ``fc1`` (768 -> 3072),
``fc2`` (3072 -> 768) at rank 64 (48 layers), fp32, on CUDA when present else on the CPU. Quick: 2 layers at
d=64, rank 8.
"""

from __future__ import annotations

import torch
from torch import nn

from bench.common import cost_rows, make_row, resolve_device, time_fn
from lowrank_kernels.nn import LowRankLinear
from lowrank_kernels.rank import RankController

KERNEL = "rank_controller"
UPSTREAM_POWER_ITERS = 5  # the adaptive low-rank training code's default ``power_iters``


def make_layers(depth: int, dim: int, rank: int, dev: torch.device) -> nn.ModuleDict:
    """The LowRankLinear layers of ``depth`` transformer blocks (mlp ratio 4), names as in the demo models."""
    layers = nn.ModuleDict()
    for i in range(depth):
        for name, (i_f, o_f) in {"qkv": (dim, 3 * dim), "proj": (dim, dim), "fc1": (dim, 4 * dim),
                                 "fc2": (4 * dim, dim)}.items():
            layers[f"b{i}_{name}"] = LowRankLinear(i_f, o_f, rank, device=dev)
    return layers


def _with_adam_state(layers: nn.Module) -> torch.optim.AdamW:
    opt = torch.optim.AdamW(layers.parameters(), lr=1e-3)
    for p in layers.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


def upstream_stable_rank(U: torch.Tensor, V: torch.Tensor, iters: int = UPSTREAM_POWER_ITERS) -> float:
    """The per-layer reference estimate: form ``W``, Frobenius norm, power iteration from a random vector (one
    host sync)."""
    W = U @ V
    v = torch.randn(W.shape[1], device=W.device, dtype=W.dtype)
    v = v / v.norm()
    sigma = W.new_zeros(())
    for _ in range(iters):
        u = W @ v
        sigma = u.norm()
        u = u / (sigma + 1e-8)
        v = W.t() @ u
        v = v / (v.norm() + 1e-8)
    return float(W.square().sum() / (sigma.square() + 1e-8))


def upstream_resize(layer: LowRankLinear, new_rank: int) -> None:
    """The per-layer reference resize: full SVD of ``W`` (shrink) or random columns (grow); new Parameter
    objects."""
    with torch.no_grad():
        U, V = layer.U.detach(), layer.V.detach()
        if new_rank < U.shape[1]:
            u, s, vh = torch.linalg.svd(U @ V, full_matrices=False)
            root = s[:new_rank].sqrt()
            U_new, V_new = u[:, :new_rank] * root, root[:, None] * vh[:new_rank]
        else:
            extra = new_rank - U.shape[1]
            U_new = torch.cat([U, torch.randn(U.shape[0], extra, device=U.device) * 0.02], dim=1)
            V_new = torch.cat([V, torch.randn(extra, V.shape[1], device=V.device) * 0.02], dim=0)
    layer.U = nn.Parameter(U_new)
    layer.V = nn.Parameter(V_new)


def _upstream_fn(layers: nn.ModuleDict, rank: int, resize: bool):
    toggle = [rank]

    def step():
        srs = [upstream_stable_rank(m.U.detach(), m.V.detach()) for m in layers.values()]
        if resize:
            toggle[0] = rank - 4 if toggle[0] == rank else rank
            for m in layers.values():
                upstream_resize(m, toggle[0])
            torch.optim.AdamW(layers.parameters(), lr=1e-3)  # the reference rebuilds the optimizer: moments lost
        return srs

    return step


def _ours_fn(layers: nn.ModuleDict, rank: int, resize: bool):
    # A hysteresis band no EMA leaves: every step() takes a full decision and keeps every rank.
    ctrl = RankController(layers, _with_adam_state(layers), min_rank=1, interval=1, grow_threshold=1e9,
                          shrink_threshold=0.999)
    toggle = [rank]

    def step():
        if not resize:
            return ctrl.step()
        toggle[0] = rank - 4 if toggle[0] == rank else rank
        return ctrl.apply({name: toggle[0] for name in ctrl.layers})  # estimate (for the events) + resize

    return step


def run(quick: bool = True, device: str | None = None) -> list[dict]:
    """Time, launch and sync rows for ``ours`` and ``upstream`` at 0 and all layers resized (see the module
    docstring)."""
    dev = resolve_device(device)
    depth, dim, rank = (2, 64, 8) if quick else (12, 768, 64)
    config = {"depth": depth, "dim": dim, "rank": rank, "dtype": "float32"}
    rows: list[dict] = []
    torch.manual_seed(0)
    for resize in (False, True):
        n_layers = 4 * depth
        for provider, make in (("ours", _ours_fn), ("upstream", _upstream_fn)):
            layers = make_layers(depth, dim, rank, dev)
            fn = make(layers, rank, resize)
            # the full upstream resize costs seconds per call on a CPU: a few calls are enough
            warmup, rep = (5, 20) if quick else (1, 1) if dev.type == "cpu" else (50, 500)
            p50, p20, p80 = time_fn(fn, dev, warmup=warmup, rep=rep)
            x = n_layers if resize else 0
            rows.append(make_row(KERNEL, provider, "step", "time", "ms", "resized_layers", x, p50, p20, p80, config))
            rows += cost_rows(KERNEL, provider, "step", fn, "resized_layers", x, config)
    return rows


if __name__ == "__main__":
    from bench.common import main

    main(run)
