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

TensLoRA+ (learning-rate groups, mode metrics, rank allocation) is in :mod:`.tenslora_plus`, which imports
this module (never the other way round).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._modules import set_submodule
from ..ops.lora_matmul import lora_matmul

__all__ = ["METHODS", "TensLoRALinear", "TensorAdapter", "apply_tenslora", "get_adapters", "parse_ranks"]

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


def _int_attr(objs, names) -> int | None:
    """The first ``int`` attribute among ``names`` on the first object that has one."""
    for obj in objs:
        for a in names:
            v = getattr(obj, a, None)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
    return None


def _configs(model: nn.Module, mod: nn.Module) -> list:
    """Where head counts may live: the attention module, its ``config`` and the model's (text) config.

    transformers keeps ``num_attention_heads`` / ``num_key_value_heads`` / ``head_dim`` on the config; LLaMA-style
    attention modules carry only ``head_dim`` and ``num_key_value_groups``."""
    out = [mod]
    for owner in (mod, model):
        cfg = getattr(owner, "config", None)
        if cfg is not None:
            text = cfg.get_text_config() if callable(getattr(cfg, "get_text_config", None)) else cfg
            out += [c for c in (cfg, text) if c not in out]
    return out


def _attention_blocks(model: nn.Module) -> list[dict]:
    """Attention modules in forward order: their projections (fused or separate) and, per projection
    (``"q"``, ``"k"``, ``"v"``), its output size and head count (None when unknown), plus the head dim."""
    found = []
    for name, mod in model.named_modules():
        fused = getattr(mod, "qkv", None)
        if isinstance(fused, nn.Linear):
            dim = fused.out_features // 3
            projs = {p: (f"{name}.qkv", fused, i * dim) for i, p in enumerate("qkv")}
            outs = dict.fromkeys("qkv", dim)
        else:
            trio = next((t for t in _PROJ_NAMES if all(isinstance(getattr(mod, n, None), nn.Linear) for n in t)), None)
            if trio is None:
                continue
            projs = {p: (f"{name}.{n}", getattr(mod, n), 0) for p, n in zip("qkv", trio, strict=True)}
            outs = {p: projs[p][1].out_features for p in "qkv"}
        where = _configs(model, mod)
        heads = _int_attr(where, ("heads", "num_heads", "num_attention_heads", "n_head"))
        hd = _int_attr(where, ("head_dim", "attention_head_size"))
        if hd is None and heads:
            hd = outs["q"] // heads
        kv_heads = _int_attr(where, ("num_key_value_heads", "num_kv_heads", "n_kv_heads"))
        groups = _int_attr([mod], ("num_key_value_groups",))
        if kv_heads is None and heads and groups:
            kv_heads = heads // groups
        if kv_heads is None and heads and hd and outs["k"] == outs["q"]:
            kv_heads = heads
        if kv_heads is None and hd and outs["k"] % hd == 0:
            kv_heads = outs["k"] // hd
        proj_heads = {"q": heads, "k": kv_heads, "v": kv_heads}
        found.append(dict(name=name, projs=projs, out=outs, heads=proj_heads, head_dim=hd,
                          in_dim=projs["q"][1].in_features))
    return found


def _check_blocks(blocks: list[dict], method: str, modes: tuple[str, ...], target: str) -> None:
    """One tensor needs equal sizes: across layers, and across projections when ``qkv`` is a mode."""
    b0 = blocks[0]
    for b in blocks:
        for p in target:
            if (b["in_dim"], b["out"][p], b["heads"][p], b["head_dim"]) != (b0["in_dim"], b0["out"][p],
                                                                           b0["heads"][p], b0["head_dim"]):
                raise ValueError(f"attention {b['name']} differs in shape from {b0['name']}: one tensor needs equal "
                                 "sizes")
    if "heads" in modes:
        for p in target:
            h, hd = b0["heads"][p], b0["head_dim"]
            if not h or not hd:
                raise ValueError(f"method {method!r} needs the number of heads, not found on {b0['name']} or its "
                                 "config (num_attention_heads / num_key_value_heads)")
            if h * hd != b0["out"][p]:
                raise ValueError(f"{b0['projs'][p][0]}: {b0['out'][p]} output rows are not {h} heads x head_dim {hd}")
    if "qkv" in modes and len({b0["out"][p] for p in target}) > 1:
        sizes = ", ".join(f"{p}: {b0['out'][p]} rows ({b0['heads'][p]} heads)" for p in target)
        raise ValueError(
            f"method {method!r} stacks the {target!r} projections into one tensor, but {b0['name']} has grouped-query "
            f"attention with unequal sizes ({sizes}). Use a method without the qkv mode ('att', 'depth', "
            "'att_depth': one tensor per projection) or a target whose projections have equal sizes (e.g. 'kv')")


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
    separate ``query/key/value`` / ``q_proj/k_proj/v_proj`` Linears (transformers BERT, RoBERTa, ViT, LLaMA).
    Head counts are read from the attention module or, as transformers keeps them, from ``model.config``
    (``num_attention_heads``, ``num_key_value_heads``, ``head_dim``).

    Grouped-query attention (``num_key_value_heads < num_attention_heads``: K and V have fewer rows than Q) is
    supported by the methods that give each projection its own tensor (``att``, ``depth``, ``att_depth``; each
    tensor then has its projection's head count) and by any method whose ``target`` projections have equal
    sizes (e.g. ``target="kv"``). A method with the ``qkv`` mode over projections of unequal sizes has no
    well-defined tensor and is refused with ``ValueError`` here, before the model is changed.

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
    _check_blocks(blocks, method, modes, target)
    b0 = blocks[0]

    def dims_of(p: str) -> list[int]:
        size = {"input": b0["in_dim"], "output": b0["out"][p], "heads": b0["heads"][p], "head_dim": b0["head_dim"],
                "qkv": len(target), "layers": len(blocks)}
        return [size[m] for m in modes]

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
                adapters[key] = TensorAdapter(modes, dims_of(p), r, decomposition, init).to(
                    b["projs"][p][1].weight.device)
            lname, lin, start = b["projs"][p]
            slots.setdefault(lname, []).append((start, adapters[key], li if "layers" in modes else 0,
                                                pi if "qkv" in modes else 0))
            linears[lname] = lin
    for lname, sl in slots.items():
        set_submodule(model, lname, TensLoRALinear(linears[lname], sl, scaling))
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
