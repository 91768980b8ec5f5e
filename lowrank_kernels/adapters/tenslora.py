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


# TensLoRA+ (learning-rate groups, mode metrics, rank allocation) lives in its own file; re-exported here so
# ``tenslora.param_groups`` etc. keep working. Imported last: it imports the classes above.
from .tenslora_plus import allocate_ranks, mode_metrics, param_groups, resize_adapter  # noqa: E402
