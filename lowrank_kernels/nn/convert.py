"""Model surgery: ``replace_linear`` (dense -> low-rank) and ``fuse_peft_lora`` (PEFT -> fused LoRA)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_positive_int
from .._modules import is_conv1d, is_linear_like, matches_target, set_submodule
from .lora_linear import LoRALinear
from .lowrank_linear import LowRankLinear

__all__ = ["PeftFusedLoRALinear", "fuse_peft_lora", "matches_target", "replace_linear", "tied_parameters"]


def tied_parameters(model: nn.Module) -> dict[str, list[str]]:
    """``{module name: [other places holding the same weight]}`` for every Linear-like module of ``model``
    whose ``weight`` Parameter is also registered elsewhere (e.g. GPT-2's ``lm_head`` and ``transformer.wte``),
    the other places given as ``"<module>.<parameter>"``. The same module object registered under several
    names is not a tie (it is converted once, under every name).

    Ties declared by transformers are included even before they are made: a model's ``all_tied_weights_keys``
    (``{"lm_head.weight": "transformer.wte.weight"}`` when ``config.tie_word_embeddings``), because
    ``from_pretrained`` ties weights only after the model's ``__init__`` has run."""
    owners: dict[int, list[tuple[str, int, str]]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((name, id(mod), pname))
    out: dict[str, list[str]] = {}
    for name, mod in model.named_modules():
        if name and is_linear_like(mod):
            others = [f"{n}.{pn}" for n, mid, pn in owners.get(id(mod.weight), []) if mid != id(mod)]
            if others:
                out[name] = others
    for prefix, mod in model.named_modules():
        declared = getattr(mod, "all_tied_weights_keys", None)
        if not isinstance(declared, dict):
            continue
        for target, source in declared.items():
            owner, _, pname = f"{prefix}.{target}".lstrip(".").rpartition(".")
            source = f"{prefix}.{source}".lstrip(".")
            try:
                layer = model.get_submodule(owner)
            except AttributeError:
                continue
            if pname == "weight" and is_linear_like(layer) and source not in out.setdefault(owner, []):
                out[owner].append(source)
    return {k: v for k, v in out.items() if v}


def replace_linear(model: nn.Module, rank: int, target_modules: str | Iterable[str] | None = None) -> nn.Module:
    """Swap every matching ``nn.Linear`` or transformers ``Conv1D`` of ``model`` for
    ``LowRankLinear.from_linear(layer, rank)`` (best rank-``rank`` approximation; exact at full rank).

    Args:
        model: modified in place. A bare ``nn.Linear`` / ``Conv1D`` is converted and returned.
        rank: the rank of every new layer (``<= min(in, out)`` of each targeted layer).
        target_modules: None (every Linear-like layer), a list of names or name suffixes (``["q_proj", "fc1"]``),
            or a regex matched against the whole dotted name (``r".*\\.attn\\..*"``), as in PEFT.

    Tied weights are never untied. A layer whose ``weight`` is shared with another module (GPT-2's and
    LLaMA's ``lm_head`` tied to the input embedding, see :func:`tied_parameters`) is skipped when
    ``target_modules`` is None and refused with ``ValueError`` when it is named explicitly: a low-rank
    ``lm_head`` would need its own weight. The same module object registered under several names is
    converted once and the new layer is set under every name (the sharing is kept).

    Returns:
        the model. Layers inside a :class:`LoRALinear` (its frozen base) or a PEFT tuner layer (``base_layer``,
        ``lora_A``, ``lora_B``) are never touched.

    Raises:
        ValueError: no layer matched ``target_modules``, a named layer is tied, or ``rank`` is too large
        for a matched layer (the message names it; the model is left unchanged in all three cases).
    """
    check_positive_int(rank, "rank")
    if isinstance(target_modules, str) or target_modules is None:
        targets = target_modules
    else:
        targets = list(target_modules)
    if is_linear_like(model):
        return LowRankLinear.from_linear(model, rank)
    skip = {id(m.base) for m in model.modules() if isinstance(m, LoRALinear)}
    tied = tied_parameters(model)
    tied_ids = {id(model.get_submodule(n)) for n in tied}
    names_of: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    tied_hits = []
    for name, mod in model.named_modules(remove_duplicate=False):
        if not name or not is_linear_like(mod) or id(mod) in skip or not matches_target(name, targets):
            continue
        if any(part.startswith("lora_") or part == "base_layer" for part in name.split(".")):
            continue  # inside a PEFT tuner layer: its frozen base and its adapter are PEFT's
        if id(mod) in tied_ids:
            tied_hits.append(name)
            continue
        names_of.setdefault(id(mod), []).append(name)
        modules[id(mod)] = mod
    if tied_hits and targets is not None:
        detail = "; ".join(f"{n} shares its weight with {', '.join(tied.get(n, ['another module']))}"
                           for n in tied_hits)
        raise ValueError(f"target_modules={target_modules!r} names tied layers ({detail}); converting them would "
                         "untie the weights. Untie them first (e.g. config.tie_word_embeddings=False and a copied "
                         "weight) or leave them out of target_modules")
    if not modules:
        extra = f" (tied layers skipped: {tied_hits})" if tied_hits else ""
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear or Conv1D of "
                         f"{type(model).__name__}{extra}")
    new_layers = []
    for key, mod in modules.items():
        try:
            new_layers.append((names_of[key], LowRankLinear.from_linear(mod, rank)))
        except ValueError as exc:
            raise ValueError(f"{names_of[key][0]}: {exc}") from exc
    for names, new in new_layers:
        for name in names:
            set_submodule(model, name, new)
    return model


# ----------------------------------------------------------------------------------------------
# PEFT -> fused LoRALinear
# ----------------------------------------------------------------------------------------------


def _peft_lora_linear_cls():
    try:
        from peft.tuners.lora import Linear
    except ImportError as exc:  # optional dependency
        raise ImportError("fuse_peft_lora needs PEFT: pip install 'lowrank-kernels[peft]'") from exc
    return Linear


def _linear_view_of_conv1d(conv: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` whose ``weight (out, in)`` is a transposed view of the Conv1D's ``(in, out)`` storage
    (no copy; a new Parameter object with the same ``requires_grad``) and whose ``bias`` is the Conv1D's."""
    w = conv.weight
    lin = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(lin)
    lin.in_features, lin.out_features = w.shape
    lin.weight = nn.Parameter(w.data.t(), requires_grad=w.requires_grad)
    lin.bias = conv.bias
    return lin


def _from_peft_layer(layer: nn.Module, name: str) -> PeftFusedLoRALinear:
    adapters = list(layer.lora_A.keys())
    if len(adapters) != 1:
        raise ValueError(f"{name}: exactly one LoRA adapter is supported, found {adapters}")
    (adapter,) = adapters
    if adapter not in layer.active_adapters or layer.disable_adapters:
        raise ValueError(f"{name}: adapter {adapter!r} is not active")
    if layer.merged:
        raise ValueError(f"{name}: the adapter is merged; call unmerge_adapter() first")
    if adapter in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(adapter, False):
        raise ValueError(f"{name}: LoRA variants (DoRA, ...) are not supported, only vanilla LoRA")
    if getattr(layer, "lora_bias", {}).get(adapter, False):
        raise ValueError(f"{name}: lora_bias=True is not supported")
    base = layer.get_base_layer()
    fan_in_fan_out = bool(getattr(layer, "fan_in_fan_out", False))
    if fan_in_fan_out:
        if not is_conv1d(base):
            raise ValueError(f"{name}: fan_in_fan_out=True needs a transformers Conv1D base, got {type(base).__name__}")
        base = _linear_view_of_conv1d(base)
    elif type(base) is not nn.Linear:
        hint = " (a Conv1D base needs fan_in_fan_out=True in the LoraConfig)" if is_conv1d(base) else ""
        raise ValueError(f"{name}: the base layer must be a plain nn.Linear or a Conv1D, got "
                         f"{type(base).__name__}{hint}")
    drop = layer.lora_dropout[adapter]
    p = drop.p if isinstance(drop, nn.Dropout) else 0.0
    fused = PeftFusedLoRALinear.from_factors(base, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight,
                                             layer.scaling[adapter], dropout=p)
    fused._install_peft_names(adapter, fan_in_fan_out)
    return fused


class PeftFusedLoRALinear(LoRALinear):
    """A :class:`LoRALinear` made by :func:`fuse_peft_lora` that keeps the PEFT layer's checkpoint format.

    Its ``state_dict`` uses the keys of the PEFT layer it replaced (``base_layer.weight``, ``base_layer.bias``,
    ``lora_A.<adapter>.weight``, ``lora_B.<adapter>.weight``; a Conv1D base weight as ``(in, out)``) and it loads
    from them. The class is registered as a virtual subclass of PEFT's ``BaseTunerLayer`` so that PEFT's
    structural adapter discovery (``save_pretrained``, ``get_peft_model_state_dict``, ``set_peft_model_state_dict``)
    finds its ``lora_A``/``lora_B``, and ``peft_model.disable_adapter()`` / ``get_model_status()`` work. Switching
    among several adapters is not: :meth:`set_adapter` raises ``RuntimeError``.
    """

    adapter_name: str = "default"
    fan_in_fan_out: bool = False
    adapter_layer_names = ("lora_A", "lora_B")  # what PEFT's BaseTunerLayer protocol reads
    other_param_names = ("r", "scaling")

    def _peft_keys(self) -> dict[str, str]:
        a = self.adapter_name
        return {"lora_A": f"lora_A.{a}.weight", "lora_B": f"lora_B.{a}.weight",
                "base.weight": "base_layer.weight", "base.bias": "base_layer.bias"}

    def _install_peft_names(self, adapter: str, fan_in_fan_out: bool) -> None:
        self.adapter_name, self.fan_in_fan_out = adapter, fan_in_fan_out
        self.register_state_dict_post_hook(_to_peft_names)
        self.register_load_state_dict_pre_hook(_from_peft_names)

    @property
    def active_adapters(self) -> list[str]:
        return [self.adapter_name]

    @property
    def disable_adapters(self) -> bool:
        return getattr(self, "_adapters_off", False)

    @property
    def merged_adapters(self) -> list[str]:
        return [self.adapter_name] if self.merged else []

    def _get_available_adapters(self) -> set[str]:
        return {self.adapter_name}

    def enable_adapters(self, enabled: bool) -> None:
        """PEFT's switch (``with peft_model.disable_adapter():``): while disabled the layer is its base layer and
        the adapter gets no gradient (``requires_grad`` off, as PEFT does; back on when enabled again)."""
        self._adapters_off = not enabled
        self.lora_A.requires_grad_(enabled)
        self.lora_B.requires_grad_(enabled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return F.linear(x, self.weight, self.bias)
        return super().forward(x)

    def set_adapter(self, *args, **kwargs):
        raise RuntimeError("a layer fused by fuse_peft_lora has one fixed adapter; switch adapters on the unfused "
                           "PEFT model")


def _to_peft_names(module: PeftFusedLoRALinear, state_dict, prefix, local_metadata) -> None:
    for ours, theirs in module._peft_keys().items():
        if prefix + ours in state_dict:
            t = state_dict.pop(prefix + ours)
            state_dict[prefix + theirs] = t.t() if module.fan_in_fan_out and ours == "base.weight" else t


def _from_peft_names(module: PeftFusedLoRALinear, state_dict, prefix, local_metadata, strict, missing_keys,
                     unexpected_keys, error_msgs) -> None:
    for ours, theirs in module._peft_keys().items():
        if prefix + theirs in state_dict:
            t = state_dict.pop(prefix + theirs)
            state_dict[prefix + ours] = t.t() if module.fan_in_fan_out and ours == "base.weight" else t


def _register_with_peft() -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not issubclass(PeftFusedLoRALinear, BaseTunerLayer):
        BaseTunerLayer.register(PeftFusedLoRALinear)


def fuse_peft_lora(peft_model: nn.Module) -> nn.Module:
    """Replace each PEFT ``peft.tuners.lora.Linear`` in ``peft_model`` with a fused :class:`LoRALinear`.

    The new layers reuse PEFT's parameter objects (base ``bias``, ``lora_A.weight`` as ``lora_A``,
    ``lora_B.weight`` as ``lora_B``; the base ``weight`` too, except on a Conv1D base) and its ``scaling`` and
    dropout probability, so outputs and gradients match PEFT's (up to floating-point rounding; with dropout, the
    same RNG draws) and an optimizer built on PEFT's trainable parameters keeps working.

    Supported: one active vanilla LoRA adapter per layer, not merged, on an ``nn.Linear`` base or (with
    ``fan_in_fan_out=True``, as PEFT sets it for GPT-2) a transformers ``Conv1D`` base, whose ``(in, out)``
    weight becomes the ``(out, in)`` weight of an ``nn.Linear`` as a transposed view of the same storage (a new
    Parameter object; the base is frozen in LoRA, so no optimizer holds it).

    Saving is kept: each fused layer (a :class:`PeftFusedLoRALinear`) has a ``state_dict`` with PEFT's keys
    (``base_layer.weight``, ``lora_A.<adapter>.weight``, ...; the Conv1D weight as ``(in, out)``) and loads from
    them, so
    ``peft_model.save_pretrained(dir)`` writes the adapter as PEFT would and ``PeftModel.from_pretrained(base,
    dir)`` rebuilds the same function; checkpoints of the fused and the unfused model are interchangeable.
    PEFT's adapter management (``set_adapter``, ``merge_and_unload``, adding adapters) no longer applies to the
    swapped layers.

    Returns:
        the same model object, modified in place.

    Raises:
        ImportError: PEFT is not installed. ValueError: no PEFT LoRA linear layer was found, or a layer
        uses a feature listed above as unsupported (the model is left unchanged then).
    """
    lora_linear = _peft_lora_linear_cls()
    found = [(n, m) for n, m in peft_model.named_modules() if isinstance(m, lora_linear)]
    if not found:
        raise ValueError(f"no peft.tuners.lora.Linear layer found in {type(peft_model).__name__}")
    new_layers = [(n, _from_peft_layer(m, n)) for n, m in found]  # validate all before changing anything
    _register_with_peft()
    for name, new in new_layers:
        set_submodule(peft_model, name, new)
    return peft_model
