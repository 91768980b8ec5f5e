"""TensLoRA: one shared low-rank tensor (Tucker or CP) per group of attention projections.

The updates ``ΔW (out, in)`` of the Q/K/V projections of a model are stacked into one tensor with
modes among ``input`` (in features), ``head_dim``, ``heads`` (the output rows split into real heads:
row ``h·head_dim + d``), ``output`` (the rows unsplit), ``qkv`` (which projection) and ``layers`` (which
block). The ``method`` decides which modes share a tensor; the others index separate tensors:

=================  ===========================================  ===========================
method             modes of one tensor                          one tensor per
=================  ===========================================  ===========================
``att``            input, head_dim, heads                       (layer, projection)
``qkv``            input, output, qkv                           layer
``depth``          input, output, layers                        projection
``att_qkv``        input, head_dim, heads, qkv                  layer
``att_depth``      input, head_dim, heads, layers               projection
``qkv_depth``      input, output, qkv, layers                   (one)
``att_qkv_depth``  input, head_dim, heads, qkv, layers          (one)
=================  ===========================================  ===========================

Because ``input`` is a mode, every update factors as ``ΔW[l, p] = B[l, p] A`` with ``A = U_inputᵀ``
shared by the tensor: the adapted Linear runs as one :func:`ops.lora_matmul` (base GEMM + adapter in
one kernel on GPU). ``B`` for all (layer, projection) pairs of a tensor is contracted once per model
forward and cached; the ``(in × out × ...)`` tensor itself is never materialised in the forward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.lora_matmul import lora_matmul

__all__ = ["METHODS", "TensLoRALinear", "TensorAdapter", "allocate_ranks", "apply_tenslora", "get_adapters",
           "mode_metrics", "param_groups", "parse_ranks", "resize_adapter"]

# method -> (modes, what indexes separate tensors)
METHODS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "att": (("input", "head_dim", "heads"), ("layer", "proj")),
    "qkv": (("input", "output", "qkv"), ("layer",)),
    "depth": (("input", "output", "layers"), ("proj",)),
    "att_qkv": (("input", "head_dim", "heads", "qkv"), ("layer",)),
    "att_depth": (("input", "head_dim", "heads", "layers"), ("proj",)),
    "qkv_depth": (("input", "output", "qkv", "layers"), ()),
    "att_qkv_depth": (("input", "head_dim", "heads", "qkv", "layers"), ()),
}
_LETTER = {"input": "a", "head_dim": "d", "heads": "h", "output": "o", "qkv": "p", "layers": "l"}
_PROJ_NAMES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q", "k", "v"))


def parse_ranks(ranks: int | str | Sequence[int], n_modes: int, decomposition: str) -> list[int]:
    """``8``, ``"8_8_4"`` or ``[8, 8, 4]`` -> per-mode ranks (Tucker: ``n_modes`` of them; CP: one)."""
    if isinstance(ranks, str):
        try:
            ranks = [int(r) for r in ranks.split("_")]
        except ValueError as e:
            raise ValueError(f"ranks string must look like '8_8_8', got {ranks!r}") from e
    if isinstance(ranks, int) and not isinstance(ranks, bool):
        ranks = [ranks] * (n_modes if decomposition == "tucker" else 1)
    ranks = list(ranks)
    if any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks):
        raise ValueError(f"ranks must be positive ints, got {ranks}")
    if decomposition == "cp":
        if len(set(ranks)) != 1:
            raise ValueError(f"CP has a single rank shared by all modes, got {ranks}")
        return ranks[:1]
    if len(ranks) != n_modes:
        raise ValueError(f"Tucker needs {n_modes} per-mode ranks for this method, got {len(ranks)}: {ranks}")
    return ranks


class TensorAdapter(nn.Module):
    """One low-rank tensor over ``modes`` with sizes ``dims``.

    Tucker: ``core (r_1, ..., r_n)`` (zeros: the adapted model starts equal to the base model) and one
    factor ``(dim_k, r_k)`` per mode. CP: factors ``(dim_k, R)``, the ``input`` one zero so that CP
    starts at the base model too. Other factors: ``init`` (orthogonal, the original TensLoRA default,
    or Kaiming-uniform as LoRA's A).
    Parameters: ``Σ r_k dim_k + Π r_k`` (Tucker) or ``R Σ dim_k`` (CP).
    """

    def __init__(self, modes: Sequence[str], dims: Sequence[int], ranks: int | str | Sequence[int],
                 decomposition: str = "tucker",
                 init: str = "orthogonal"):
        super().__init__()
        if decomposition not in ("tucker", "cp"):
            raise ValueError(f"decomposition must be 'tucker' or 'cp', got {decomposition!r}")
        if modes[0] != "input":
            raise ValueError(f"the first mode must be 'input', got {modes}")
        self.modes, self.dims, self.decomposition = tuple(modes), tuple(dims), decomposition
        self.ranks = parse_ranks(ranks if isinstance(ranks, (int, str)) else list(ranks), len(modes), decomposition)
        r_of = self.ranks if decomposition == "tucker" else self.ranks * len(modes)
        self.core = nn.Parameter(torch.zeros(*r_of)) if decomposition == "tucker" else None
        self.factors = nn.ParameterDict({m: nn.Parameter(torch.empty(d, r)) for m, d, r in zip(modes, dims, r_of,
                                                                                              strict=True)})
        if init not in ("orthogonal", "kaiming_uniform"):
            raise ValueError(f"init must be 'orthogonal' or 'kaiming_uniform', got {init!r}")
        for m in modes:
            if decomposition == "cp" and m == "input":
                nn.init.zeros_(self.factors[m])
            elif init == "orthogonal":
                nn.init.orthogonal_(self.factors[m])
            else:
                nn.init.kaiming_uniform_(self.factors[m], a=math.sqrt(5))
        self._cache: torch.Tensor | None = None
        self._cache_key: tuple | None = None
        self.num_reconstructions = 0  # how often B was contracted (tests check: once per forward)

    # -- structure ------------------------------------------------------------------------------
    @property
    def out_dim(self) -> int:
        d = dict(zip(self.modes, self.dims, strict=True))
        return d["output"] if "output" in d else d["heads"] * d["head_dim"]

    def _ordered(self) -> list[nn.Parameter]:
        return [self.factors[m] for m in self.modes]  # ParameterDict iterates in sorted key order

    def num_parameters(self) -> int:
        if self.decomposition == "cp":
            return self.ranks[0] * sum(self.dims)
        return sum(r * d for r, d in zip(self.ranks, self.dims, strict=True)) + math.prod(self.ranks)

    def _out_letters(self) -> str:
        s = "L" if "layers" in self.modes else ""
        s += "P" if "qkv" in self.modes else ""
        return s + ("HD" if "heads" in self.modes else "O")

    # -- contraction ----------------------------------------------------------------------------
    def input_factor(self) -> torch.Tensor:
        """``A = U_inputᵀ``: ``(r_input, in)``."""
        return self.factors["input"].t()

    def output_factors(self) -> torch.Tensor:
        """``B`` for every (layer, projection) of this tensor: ``(L, P, out, r_input)`` (L, P = 1 if absent).

        Cached until the next forward of the adapted model (see :func:`apply_tenslora`), a change of any
        parameter (in-place optimizer steps bump their version) or a switch of grad mode.
        """
        key = (torch.is_grad_enabled(), *(p._version for p in self.parameters()), *(id(p) for p in self.parameters()))
        if self._cache is not None and key == self._cache_key:
            return self._cache
        rest = [m for m in self.modes if m != "input"]
        ops = [self.factors[m] for m in rest]
        if self.decomposition == "tucker":
            spec = "".join(_LETTER[m] for m in self.modes)
            ins = [spec] + [_LETTER[m].upper() + _LETTER[m] for m in rest]
            b = torch.einsum(",".join(ins) + "->" + self._out_letters() + "a", self.core, *ops)
        else:
            ins = [_LETTER[m].upper() + "r" for m in rest]
            b = torch.einsum(",".join(ins) + "->" + self._out_letters() + "r", *ops)
        d = dict(zip(self.modes, self.dims, strict=True))
        b = b.reshape(d.get("layers", 1), d.get("qkv", 1), self.out_dim, self.ranks[0])
        self._cache, self._cache_key = b, key
        self.num_reconstructions += 1
        return b

    def invalidate(self) -> None:
        self._cache = self._cache_key = None

    def __getstate__(self):
        # the cache may hold a non-leaf tensor, which deepcopy/pickle refuse: never copy it
        state = self.__dict__.copy()
        state["_cache"] = state["_cache_key"] = None
        return state

    def delta_weight(self, layer: int = 0, proj: int = 0) -> torch.Tensor:
        """The update ``ΔW (out, in)`` of (layer, projection), unscaled."""
        return self.output_factors()[layer, proj] @ self.input_factor()

    def full_tensor(self) -> torch.Tensor:
        """The represented tensor in ``modes`` order (tests / metrics only; the forward never builds it)."""
        letters = "".join(_LETTER[m] for m in self.modes)
        if self.decomposition == "tucker":
            ins = [letters] + [_LETTER[m].upper() + _LETTER[m] for m in self.modes]
            return torch.einsum(",".join(ins) + "->" + letters.upper(), self.core, *self._ordered())
        ins = [_LETTER[m].upper() + "r" for m in self.modes]
        return torch.einsum(",".join(ins) + "->" + letters.upper(), *self._ordered())

    def extra_repr(self) -> str:
        return f"{self.decomposition}, modes={self.modes}, dims={self.dims}, ranks={self.ranks}"


class TensLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` whose output rows receive TensLoRA updates: ``y = base(x) + s·x ΔWᵀ``.

    ``slots``: ``(row_start, adapter, layer_index, proj_index)`` for each block of ``adapter.out_dim``
    rows (a fused qkv Linear has three blocks). Rows without a slot get no update. All slots become one
    LoRA pair ``A = [A_1; A_2; ...]`` (one per distinct adapter) and a block ``B``, run by
    :func:`ops.lora_matmul`. The adapters are referenced, not owned (they live in
    ``model.tenslora_adapters``), so each appears once in ``model.parameters()``.
    """

    def __init__(self, base: nn.Linear, slots: Sequence[tuple[int, TensorAdapter, int, int]], scaling: float):
        super().__init__()
        self.base = base
        self.scaling = float(scaling)
        self._slots = tuple(slots)  # a tuple: nn.Module does not register (own) these adapters

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A (r_total, in), B (out, r_total))`` with ``ΔW = B A`` for the whole Linear."""
        uniq: list[TensorAdapter] = []
        for _, ad, _, _ in self._slots:
            if all(ad is not u for u in uniq):
                uniq.append(ad)
        a = torch.cat([u.input_factor() for u in uniq]) if len(uniq) > 1 else uniq[0].input_factor()
        outs = {id(u): u.output_factors() for u in uniq}
        rows, cursor = [], 0
        zeros = {id(u): a.new_zeros(u.out_dim, u.ranks[0]) for u in uniq}
        for start, ad, li, pi in sorted(self._slots, key=lambda s: s[0]):
            if start > cursor:
                rows.append(a.new_zeros(start - cursor, a.shape[0]))
            blocks = [outs[id(u)][li, pi] if u is ad else zeros[id(u)] for u in uniq]
            rows.append(torch.cat(blocks, dim=1) if len(blocks) > 1 else blocks[0])
            cursor = start + ad.out_dim
        if cursor < self.base.out_features:
            rows.append(a.new_zeros(self.base.out_features - cursor, a.shape[0]))
        return a, torch.cat(rows) if len(rows) > 1 else rows[0]

    def delta_weight(self) -> torch.Tensor:
        a, b = self.factors()
        return self.scaling * (b @ a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        w, bias = self.base.weight, self.base.bias
        if x.dtype != w.dtype:  # autocast / mixed dtypes: the unfused path, cast like PEFT
            return self.base(x) + self.scaling * F.linear(F.linear(x.to(a.dtype), a), b).to(x.dtype)
        return lora_matmul(x, w, a.to(w.dtype), b.to(w.dtype), self.scaling, bias)


def _attention_blocks(model: nn.Module) -> list[dict]:
    """Attention modules in forward order: their projections (fused or separate), heads and head dim."""
    found = []
    for name, mod in model.named_modules():
        heads = next((getattr(mod, a) for a in ("heads", "num_heads", "num_attention_heads")
                      if isinstance(getattr(mod, a, None), int)), None)
        fused = getattr(mod, "qkv", None)
        if isinstance(fused, nn.Linear):
            dim = fused.out_features // 3
            projs = {p: (f"{name}.qkv", fused, i * dim) for i, p in enumerate("qkv")}
        else:
            trio = next((t for t in _PROJ_NAMES if all(isinstance(getattr(mod, n, None), nn.Linear) for n in t)), None)
            if trio is None:
                continue
            projs = {p: (f"{name}.{n}", getattr(mod, n), 0) for p, n in zip("qkv", trio, strict=True)}
            dim = projs["q"][1].out_features
        hd = next((getattr(mod, a) for a in ("head_dim", "attention_head_size") if isinstance(getattr(mod, a, None),
                                                                                               int)), None)
        if hd is None and heads:
            hd = dim // heads
        found.append(dict(name=name, projs=projs, dim=dim, heads=heads, head_dim=hd,
                          in_dim=projs["q"][1].in_features))
    return found


def apply_tenslora(model: nn.Module, method: str = "att_qkv_depth", ranks: int | str | Sequence[int] = 8,
                   decomposition: str = "tucker", target: str = "qkv", scaling: float = 1.0,
                   init: str = "orthogonal", freeze_base: bool = True) -> nn.Module:
    """Adapt the attention projections of ``model`` in place with TensLoRA; returns ``model``.

    Args:
        method: one of :data:`METHODS`.
        ranks: per-mode ranks (``"8_8_8_8_8"``, a list, or one int for every mode); CP takes one rank.
        target: which projections to adapt, a subset of ``"qkv"`` (``"qv"``: queries and values, the
            ``qkv`` mode then has size 2).
        scaling: multiplies every update (``y = base(x) + scaling · x ΔWᵀ``).
        freeze_base: set ``requires_grad=False`` on every pre-existing parameter (unfreeze a new
            classification head yourself).

    Finds attention modules with a fused ``qkv`` Linear (rows ``[Q; K; V]``, timm / our ``TinyViT``) or
    separate ``query/key/value`` / ``q_proj/k_proj/v_proj`` Linears (``transformers`` RoBERTa, ViT).
    The adapters are stored in ``model.tenslora_adapters``; a forward pre-hook on ``model`` drops
    their cached contractions so each forward contracts each tensor exactly once.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    if not target or any(c not in "qkv" for c in target) or len(set(target)) != len(target):
        raise ValueError(f"target must be a non-empty subset of 'qkv', got {target!r}")
    if hasattr(model, "tenslora_adapters"):
        raise ValueError("model already has TensLoRA adapters")
    modes, per = METHODS[method]
    blocks = _attention_blocks(model)
    if not blocks:
        raise ValueError("no attention module with fused qkv or separate query/key/value Linears found")
    b0 = blocks[0]
    for b in blocks:
        if (b["in_dim"], b["dim"], b["heads"], b["head_dim"]) != (b0["in_dim"], b0["dim"], b0["heads"],
                                                                 b0["head_dim"]):
            raise ValueError(f"attention {b['name']} differs in shape from {b0['name']}: one tensor needs equal sizes")
    if "heads" in modes and not b0["heads"]:
        raise ValueError(f"method {method!r} needs the number of heads, not found on {b0['name']}")
    size = {"input": b0["in_dim"], "output": b0["dim"], "heads": b0["heads"], "head_dim": b0["head_dim"],
            "qkv": len(target), "layers": len(blocks)}
    dims = [size[m] for m in modes]
    r = parse_ranks(ranks, len(modes), decomposition)
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    adapters: dict[tuple, TensorAdapter] = {}
    slots: dict[str, list] = {}
    linears: dict[str, nn.Linear] = {}
    for li, b in enumerate(blocks):
        for pi, p in enumerate(target):
            key = tuple({"layer": li, "proj": pi}[k] for k in per)
            if key not in adapters:
                adapters[key] = TensorAdapter(modes, dims, r, decomposition, init).to(b["projs"][p][1].weight.device)
            lname, lin, start = b["projs"][p]
            slots.setdefault(lname, []).append((start, adapters[key], li if "layers" in modes else 0,
                                                pi if "qkv" in modes else 0))
            linears[lname] = lin
    for lname, sl in slots.items():
        parent_name, _, child = lname.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, TensLoRALinear(linears[lname], sl, scaling))
    model.tenslora_adapters = nn.ModuleList(adapters.values())
    model.tenslora_method = method

    def _invalidate(module, args):
        for ad in module.tenslora_adapters:
            ad.invalidate()

    model.register_forward_pre_hook(_invalidate)
    return model


def get_adapters(model: nn.Module) -> list[TensorAdapter]:
    if not hasattr(model, "tenslora_adapters"):
        raise ValueError("model has no TensLoRA adapters (call apply_tenslora first)")
    return list(model.tenslora_adapters)


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
