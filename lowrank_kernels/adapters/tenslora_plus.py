"""TensLoRA+: heterogeneous learning rates and rank allocation for :mod:`.tenslora` adapters.

This module imports :mod:`.tenslora`, which never imports it back. ``param_groups`` gives the Tucker core
and each factor mode its own learning rate (LoRA+'s idea applied to the core, as the TensLoRA+ extension of
TensLoRA (Marmoret et al.) proposes); ``mode_metrics`` measures each mode unfolding of the core (SVD entropy, top-1
energy) and ``allocate_ranks`` / ``resize_adapter`` move a parameter budget between modes while keeping
the adapter's current update (HOSVD truncate / expand).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .tenslora import _LETTER, TensorAdapter, get_adapters, parse_ranks

__all__ = ["allocate_ranks", "mode_metrics", "param_groups", "resize_adapter"]


def param_groups(model: nn.Module, lr: float, core_mult: float = 1.0,
                 mode_mults: dict[str, float] | None = None, weight_decay: float | None = None) -> list[dict]:
    """TensLoRA+ optimizer groups: Tucker cores at ``lr·core_mult``, the factors of mode ``m`` at
    ``lr·mode_mults[m]`` (default 1), every other trainable parameter (e.g. a new head) at ``lr``.

    Each group carries a ``"name"`` (``"tenslora.core"``, ``"tenslora.<mode>"``, ``"other"``).
    """
    mode_mults = dict(mode_mults or {})
    unknown = set(mode_mults) - set(_LETTER)
    if unknown:
        raise ValueError(f"unknown modes in mode_mults: {sorted(unknown)} (modes: {sorted(_LETTER)})")
    groups: dict[str, dict] = {}
    seen: set[int] = set()

    def add(name, p, mult):
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            groups.setdefault(name, {"params": [], "lr": lr * mult, "name": name})["params"].append(p)

    for ad in get_adapters(model):
        if ad.core is not None:
            add("tenslora.core", ad.core, core_mult)
        for m, f in ad.factors.items():
            add(f"tenslora.{m}", f, mode_mults.get(m, 1.0))
    for p in model.parameters():
        add("other", p, 1.0)
    out = list(groups.values())
    if weight_decay is not None:
        for g in out:
            g["weight_decay"] = weight_decay
    return out


def _orthonormal_core(ad: TensorAdapter) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Tucker: ``(G', [Q_k])`` with ``T = G' ×_k Q_k``, ``Q_k (dim_k, q_k)`` orthonormal: the factors'
    QR ``U_k = Q_k R_k`` folded into the core, so the core's spectra do not depend on how scale is split
    between core and factors."""
    g = ad.core.detach().double()
    qs = []
    for k, f in enumerate(ad._ordered()):
        q, rr = torch.linalg.qr(f.detach().double())
        qs.append(q)
        g = torch.movedim(torch.tensordot(rr, g, dims=([1], [k])), 0, k)
    return g, qs


def _mode_energies(ad: TensorAdapter) -> list[torch.Tensor]:
    """Squared singular values of every mode unfolding ``T_(k)`` of the represented tensor."""
    if ad.decomposition == "tucker":
        g, _ = _orthonormal_core(ad)
        return [torch.linalg.svdvals(_unfold(g, k)).square() for k in range(g.dim())]
    # CP: T_(k) T_(k)ᵀ = U_k (∘_{j≠k} U_jᵀU_j) U_kᵀ (Khatri-Rao Gram = Hadamard product of Grams),
    # evaluated in the R x R space of U_k's QR: never forms the R^n core.
    us = [f.detach().double() for f in ad._ordered()]
    grams = [u.t() @ u for u in us]
    out = []
    for k, u in enumerate(us):
        h = math.prod(grams[j] for j in range(len(us)) if j != k)
        rk = torch.linalg.qr(u)[1]
        out.append(torch.linalg.eigvalsh(rk @ h @ rk.t()).clamp_min(0).flip(0))
    return out


def _unfold(t: torch.Tensor, k: int) -> torch.Tensor:
    return torch.movedim(t, k, 0).reshape(t.shape[k], -1)


def mode_metrics(adapter: TensorAdapter) -> dict[str, dict[str, float]]:
    """Per mode: SVD entropy and top-1 energy of the mode-k unfolding of the adapter's tensor.

    Tucker: computed on the core with the factors orthonormalised (the same spectra as the full
    tensor's unfoldings, from ``Π r_k`` numbers); CP: from the factors' Gram matrices.

    With ``p_i = s_i² / Σ s_j²``: ``entropy = −Σ p_i ln p_i``, ``normalized_entropy = entropy / ln(q)``
    (q = number of singular values; 1 = information spread evenly, 0 = one direction),
    ``top1_energy = p_1`` (near 1: a redundant mode), ``effective_rank = exp(entropy)``.
    All NaN while the update is zero (a fresh Tucker core).
    """
    out = {}
    for k, (m, e) in enumerate(zip(adapter.modes, _mode_energies(adapter), strict=True)):
        row = dict(rank=adapter.ranks[k if adapter.decomposition == "tucker" else 0], dim=adapter.dims[k])
        tot = float(e.sum())
        if tot <= 0:
            out[m] = dict(entropy=math.nan, normalized_entropy=math.nan, top1_energy=math.nan,
                          effective_rank=math.nan, **row)
            continue
        p = e / tot
        ent = float(-(p * p.clamp_min(1e-300).log()).sum())
        out[m] = dict(entropy=ent, normalized_entropy=ent / math.log(len(p)) if len(p) > 1 else 0.0,
                      top1_energy=float(p.max()), effective_rank=math.exp(ent), **row)
    return out


def resize_adapter(adapter: TensorAdapter, ranks: Sequence[int], generator: torch.Generator | None = None) -> None:
    """Re-initialise a Tucker ``adapter`` in place at new per-mode ``ranks``, keeping its update.

    HOSVD of the orthonormalised core: each mode keeps its leading singular directions (truncation:
    exact when the dropped singular values are zero, otherwise the HOSVD approximation); extra rank
    gets new orthonormal directions with zero core entries (expansion: exact). The parameters are new
    tensors: rebuild the optimizer afterwards.
    """
    if adapter.decomposition != "tucker":
        raise ValueError("resize/allocate needs a Tucker adapter (CP has a single shared rank)")
    ranks = parse_ranks(list(ranks), len(adapter.modes), "tucker")
    dev, dt = adapter.core.device, adapter.core.dtype
    with torch.no_grad():
        g, qs = _orthonormal_core(adapter)
        new_factors = []
        for k, (q, r_new) in enumerate(zip(qs, ranks, strict=True)):
            v = torch.linalg.svd(_unfold(g, k), full_matrices=False)[0]  # (q_k, q_k)
            keep = min(r_new, v.shape[1])
            v = v[:, :keep]
            g = torch.movedim(torch.tensordot(v.t(), g, dims=([1], [k])), 0, k)
            u = q @ v
            if r_new > keep:  # new directions orthogonal to the kept ones (random beyond dim_k)
                extra = torch.randn(u.shape[0], r_new - keep, dtype=u.dtype, device=u.device, generator=generator)
                n_orth = min(r_new, u.shape[0]) - keep
                if n_orth > 0:
                    basis = torch.linalg.qr(torch.cat([u, extra[:, :n_orth]], 1))[0][:, keep:]
                    extra = torch.cat([basis, extra[:, n_orth:]], 1)
                u = torch.cat([u, extra], 1)
            new_factors.append(u)
        pad = []
        for k in reversed(range(g.dim())):
            pad += [0, ranks[k] - g.shape[k]]
        g = F.pad(g, pad)
        adapter.core = nn.Parameter(g.to(dev, dt))
        adapter.factors = nn.ParameterDict({m: nn.Parameter(u.to(dev, dt)) for m, u in zip(adapter.modes, new_factors,
                                                                                            strict=True)})
    adapter.ranks = list(ranks)
    adapter.invalidate()


def allocate_ranks(adapter: TensorAdapter, budget: int, min_rank: int = 2, redundancy: float = 0.9,
                   apply: bool = True) -> tuple[list[int], TensorAdapter]:
    """Spend a Tucker parameter ``budget`` (``Σ r_k dim_k + Π r_k``) across modes by :func:`mode_metrics`.

    Modes whose top-1 energy is at least ``redundancy`` stay at ``min_rank``; the others grow one rank at
    a time, always the mode with the largest ``normalized_entropy / r_k`` (rank proportional to
    information density), while the budget allows and ``r_k < dim_k``. A zero core (no training yet)
    has no metrics: every mode then weighs the same. With ``apply`` the adapter is resized in place
    (:func:`resize_adapter`, keeping the update). Returns ``(ranks, adapter)``.
    """
    if adapter.decomposition != "tucker":
        raise ValueError("allocate_ranks needs a Tucker adapter (CP has a single shared rank)")
    dims = list(adapter.dims)
    met = mode_metrics(adapter)
    weight = [met[m]["normalized_entropy"] for m in adapter.modes]
    top1 = [met[m]["top1_energy"] for m in adapter.modes]
    if any(math.isnan(w) for w in weight):
        weight, top1 = [1.0] * len(dims), [0.0] * len(dims)
    ranks = [min(min_rank, d) for d in dims]

    def cost(rs):
        return sum(r * d for r, d in zip(rs, dims, strict=True)) + math.prod(rs)

    if cost(ranks) > budget:
        raise ValueError(f"budget {budget} is below the minimum {cost(ranks)} (every mode at rank {min_rank})")
    while True:
        best, best_key = None, 0.0
        for k in range(len(dims)):
            if top1[k] >= redundancy or ranks[k] >= dims[k]:
                continue
            trial = ranks.copy()
            trial[k] += 1
            key = max(weight[k], 1e-6) / ranks[k]
            if cost(trial) <= budget and key > best_key:
                best, best_key = k, key
        if best is None:
            break
        ranks[best] += 1
    if apply:
        resize_adapter(adapter, ranks)
    return ranks, adapter
