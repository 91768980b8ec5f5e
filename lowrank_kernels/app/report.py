"""Spectra, effective ranks, truncation and plots for ``lowrank-kernels train`` / ``demo``.

Every target layer (``nn.Linear``, ``LowRankLinear``, ``LoRALinear``, a LoRITa product...) is an affine map
``x -> x W^T + b``; its dense ``W`` is read by probing the map with the identity, so one code path measures
every technique. A fused ``qkv`` layer is measured per slice (``name:q``, ``name:k``, ``name:v``), the
operators Q3R regularises.

Effective rank, as reported: ``rank@1%`` = number of singular values above 1% of the largest; also the
stable rank ``||W||_F^2 / sigma_max^2``.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .._modules import fused_slices, matches_target, set_submodule

RANK_REL_TOL = 0.01  # rank@1%: count sigma_i > 0.01 sigma_max


@torch.no_grad()
def dense_affine(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W (out, in), b (out,))`` of an affine module (probed in eval mode, fp32 or better)."""
    if type(module) is nn.Linear:
        w, b = module.weight.detach(), module.bias
        return w, (b.detach() if b is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
    was_training = module.training
    module.eval()
    try:
        p = next(module.parameters())
        n = getattr(module, "in_features", None) or module.base.in_features
        probe = torch.cat([torch.zeros(1, n), torch.eye(n)]).to(device=p.device, dtype=p.dtype)
        y = module(probe)
    finally:
        module.train(was_training)
    return (y[1:] - y[:1]).T.contiguous(), y[0].clone()


def slice_labels(name: str, rows: int, fused: dict[str, int]) -> list[tuple[str, int, int]]:
    """``[(label, start, stop), ...]``: one entry, or one per slice of a fused layer (``qkv`` -> q, k, v)."""
    n = next((v for k, v in fused.items() if matches_target(name, [k])), None)
    if not n or n == 1:
        return [(name, 0, rows)]
    tags = "qkv" if n == 3 else [str(i) for i in range(n)]
    return [(f"{name}:{tags[i]}", a, b) for i, (a, b) in enumerate(fused_slices(name, n, rows))]


def _fresh(model: nn.Module) -> None:
    # TensLoRA caches its contractions per model forward; a layer probed alone must not see a stale cache
    for ad in getattr(model, "tenslora_adapters", ()):
        ad.invalidate()


@torch.no_grad()
def operator_weights(model: nn.Module, targets: list[str], fused: dict[str, int]) -> dict[str, torch.Tensor]:
    """``{label: W}`` (fp64, CPU) for every target layer or slice."""
    _fresh(model)
    out = {}
    for name in targets:
        w, _ = dense_affine(model.get_submodule(name))
        for label, a, b in slice_labels(name, w.shape[0], fused):
            out[label] = w[a:b].detach().cpu().to(torch.float64)  # move first: MPS has no float64
    return out


@torch.no_grad()
def spectra(model: nn.Module, targets: list[str], fused: dict[str, int]) -> dict[str, list[float]]:
    """Singular values (descending) of every target layer or slice."""
    return {k: torch.linalg.svdvals(w).tolist() for k, w in operator_weights(model, targets, fused).items()}


def rank_stats(sv: list[float]) -> dict[str, float]:
    """``{"rank": #sigma > 1% sigma_max, "stable_rank": sum sigma^2 / sigma_max^2}``."""
    if not sv or sv[0] <= 0:
        return {"rank": 0, "stable_rank": 0.0}
    return {"rank": sum(s > RANK_REL_TOL * sv[0] for s in sv),
            "stable_rank": round(sum(s * s for s in sv) / (sv[0] * sv[0]), 3)}


def effective_ranks(model: nn.Module, targets: list[str], fused: dict[str, int]) -> dict[str, int]:
    return {k: int(rank_stats(sv)["rank"]) for k, sv in spectra(model, targets, fused).items()}


def target_ranks(model: nn.Module, targets: list[str], fused: dict[str, int], target_rank) -> dict[str, int]:
    """The truncation rank of each layer or slice (Q3R's rule: a float is a fraction of ``min(m, n)``)."""
    from ..q3r import resolve_rank

    out = {}
    for label, w in operator_weights(model, targets, fused).items():
        out[label] = resolve_rank(target_rank, *w.shape, where="target_rank")
    return out


@torch.no_grad()
def truncated_copy(model: nn.Module, targets: list[str], fused: dict[str, int],
                   ranks: dict[str, int] | None) -> tuple[nn.Module, int]:
    """A copy of ``model`` whose target layers are plain ``nn.Linear`` holding the best rank-``ranks[label]``
    approximation of each layer or slice (``ranks=None``: the exact dense weight); also the parameter count
    when those layers are stored factored (``r (m + n)`` per slice, plus biases).

    A layer that the truncation leaves unchanged (every slice's rank is already at most its ``ranks[label]``,
    e.g. a controller's ``LowRankLinear`` of rank 8 truncated to 16) is counted as the cheaper of its factored
    size and its own storage, so the truncated model never counts more parameters than the model itself."""
    model = copy.deepcopy(model)
    _fresh(model)
    factored = 0
    for name in targets:
        mod = model.get_submodule(name)
        own = sum(p.numel() for p in mod.parameters())
        w, b = dense_affine(mod)
        new_w = torch.empty_like(w)
        layer, unchanged = 0, True
        for label, a, c in slice_labels(name, w.shape[0], fused):
            if ranks is None:  # densify only
                new_w[a:c] = w[a:c]
                layer += (c - a) * w.shape[1]
                continue
            r = min(ranks[label], min(c - a, w.shape[1]))
            U, S, Vh = torch.linalg.svd(w[a:c].cpu().double(), full_matrices=False)
            new_w[a:c] = ((U[:, :r] * S[:r]) @ Vh[:r]).to(device=w.device, dtype=w.dtype)
            layer += r * (c - a + w.shape[1])
            # the slice's numerical rank (as torch.linalg.matrix_rank): beyond it the truncation drops nothing
            tol = S[0] * max(c - a, w.shape[1]) * torch.finfo(w.dtype).eps if S.numel() else 0.0
            unchanged &= int((S > tol).sum()) <= r
        layer += w.shape[0]
        factored += min(layer, own) if ranks is not None and unchanged else layer
        lin = nn.Linear(w.shape[1], w.shape[0], device=w.device, dtype=w.dtype)
        lin.weight.copy_(new_w)
        lin.bias.copy_(b)
        set_submodule(model, name, lin)
    if hasattr(model, "tenslora_adapters"):  # every adapted layer is now a plain Linear (the model's
        model.tenslora_adapters = nn.ModuleList()  # cache-invalidating hook then has nothing to do)
    others = sum(p.numel() for n, p in model.named_parameters()
                 if not any(n == t or n.startswith(t + ".") for t in targets))
    return model, factored + others


# -------------------------------------------------------------------------------------------- plots
RANK_YLABELS = {
    "controller": "factor rank r of each LowRankLinear (set by the controller)",
    "lora": f"rank@1% of W + BA (#sigma > {RANK_REL_TOL:g} sigma_max)",
    "spectral-lora": f"rank@1% of W + BA (#sigma > {RANK_REL_TOL:g} sigma_max)",
    "tenslora": f"rank@1% of W + TensLoRA update (#sigma > {RANK_REL_TOL:g} sigma_max)",
    "lorita-q3r": f"rank@1% of the LoRITa product (#sigma > {RANK_REL_TOL:g} sigma_max)",
}


def line_styles(n: int) -> list[tuple[tuple, str]]:
    """``n`` distinct ``(colour, linestyle)`` pairs: the 10 colours of ``tab10``, then the next line style."""
    import matplotlib

    colours = matplotlib.colormaps["tab10"].colors
    styles = ("-", "--", ":", "-.")
    return [(colours[i % 10], styles[(i // 10) % 4]) for i in range(n)]


def write_plots(out_dir, records: list[dict], before: dict[str, list[float]], after: dict[str, list[float]],
                title: str, technique: str = "") -> list[str]:
    """loss.png, ranks.png, spectra.png in ``out_dir``; returns the written paths.

    ``ranks.png`` plots the controller's factor ranks (``factor_ranks`` records) when the run has them, else
    rank@1% of every target layer / slice, with the y-label of ``technique`` (``RANK_YLABELS``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    steps = [r["step"] for r in records if "loss" in r]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(steps, [r["loss"] for r in records if "loss" in r], lw=0.6, alpha=0.5, label="train (step)")
    ev = [r for r in records if "eval" in r]
    if ev:
        ax[0].plot([r["step"] for r in ev], [r["eval"]["loss"] for r in ev], "o-", ms=3, label="test")
        ax[1].plot([r["step"] for r in ev], [r["eval"]["acc"] for r in ev], "o-", ms=3)
    ax[0].set(xlabel="step", ylabel="loss", yscale="log", title=title)
    ax[0].legend()
    ax[1].set(xlabel="step", ylabel="test accuracy", title="accuracy")
    fig.tight_layout()
    paths.append(_save(fig, out_dir, "loss.png"))

    key = "factor_ranks" if any("factor_ranks" in r for r in records) else "ranks"
    rk = [r for r in records if key in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = list(rk[0][key]) if rk else []
    for label, (colour, style) in zip(labels, line_styles(len(labels)), strict=True):
        ax.plot([r["step"] for r in rk], [r[key].get(label, math.nan) for r in rk], lw=1.2, color=colour,
                linestyle=style, label=label)
    ylabel = RANK_YLABELS["controller"] if key == "factor_ranks" else RANK_YLABELS.get(
        technique, f"rank@1% (#sigma > {RANK_REL_TOL:g} sigma_max)")
    ax.set(xlabel="step", ylabel=ylabel, title=("controller's factor rank" if key == "factor_ranks"
                                                 else "effective rank") + " per layer")
    ax.yaxis.label.set_size(8)
    if rk:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    paths.append(_save(fig, out_dir, "ranks.png"))

    labels = list(after)
    cols = min(4, max(1, len(labels)))
    rows = max(1, math.ceil(len(labels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.4 * rows), squeeze=False)
    for i, label in enumerate(labels):
        a = axes[i // cols][i % cols]
        if label in before:
            a.semilogy(before[label], "--", lw=1, label="before")
        a.semilogy(after[label], lw=1, label="after")
        a.set_title(label, fontsize=7)
        a.set_xlabel("index i", fontsize=6)
        a.set_ylabel("singular value sigma_i", fontsize=6)
        a.tick_params(labelsize=6)
    for j in range(len(labels), rows * cols):
        axes[j // cols][j % cols].axis("off")
    if labels:
        axes[0][0].legend(fontsize=6)
    fig.suptitle("singular values before / after training", fontsize=9)
    fig.tight_layout()
    paths.append(_save(fig, out_dir, "spectra.png"))
    return paths


def _save(fig, out_dir, name: str) -> str:
    import matplotlib.pyplot as plt

    path = f"{out_dir}/{name}"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
