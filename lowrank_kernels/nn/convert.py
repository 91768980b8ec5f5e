"""Model surgery: ``replace_linear`` (dense -> low-rank) and ``fuse_peft_lora`` (PEFT -> fused LoRA)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from .._checks import check_positive_int
from .lora_linear import LoRALinear
from .lowrank_linear import LowRankLinear


def matches_target(name: str, target_modules: str | Iterable[str] | None) -> bool:
    """PEFT's rule: a string is a regex that must match the whole module name; a list matches a name
    equal to an entry or ending in ``"." + entry``; None matches everything."""
    if target_modules is None:
        return True
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def replace_linear(model: nn.Module, rank: int, target_modules: str | Iterable[str] | None = None) -> nn.Module:
    """Swap every matching ``nn.Linear`` of ``model`` for ``LowRankLinear.from_linear(linear, rank)``.

    Args:
        model: modified in place. A bare ``nn.Linear`` is converted and returned.
        rank: the rank of every new layer (``<= min(in, out)`` of each targeted layer).
        target_modules: None (all ``nn.Linear``), a list of names or name suffixes (``["q_proj", "fc1"]``),
            or a regex matched against the whole dotted name (``r".*\\.attn\\..*"``), as in PEFT.

    Returns:
        the model. ``nn.Linear`` layers inside a :class:`LoRALinear` (its frozen base) are never touched.

    Raises:
        ValueError: no module matched ``target_modules``, or ``rank`` is too large for a matched layer.
    """
    check_positive_int(rank, "rank")
    if isinstance(target_modules, str) or target_modules is None:
        targets = target_modules
    else:
        targets = list(target_modules)
    if isinstance(model, nn.Linear):
        return LowRankLinear.from_linear(model, rank)
    skip = {id(m.base) for m in model.modules() if isinstance(m, LoRALinear)}
    names = [n for n, m in model.named_modules()
             if n and isinstance(m, nn.Linear) and id(m) not in skip and matches_target(n, targets)]
    if not names:
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear of {type(model).__name__}")
    for name in names:
        try:
            new = LowRankLinear.from_linear(model.get_submodule(name), rank)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from exc
        _set_submodule(model, name, new)
    return model


def _peft_lora_linear_cls():
    try:
        from peft.tuners.lora import Linear
    except ImportError as exc:  # optional dependency
        raise ImportError("fuse_peft_lora needs PEFT: pip install 'lowrank-kernels[peft]'") from exc
    return Linear


def _from_peft_layer(layer: nn.Module, name: str) -> LoRALinear:
    adapters = list(layer.lora_A.keys())
    if len(adapters) != 1:
        raise ValueError(f"{name}: exactly one LoRA adapter is supported, found {adapters}")
    (adapter,) = adapters
    if adapter not in layer.active_adapters or layer.disable_adapters:
        raise ValueError(f"{name}: adapter {adapter!r} is not active")
    if layer.merged:
        raise ValueError(f"{name}: the adapter is merged; call unmerge_adapter() first")
    if getattr(layer, "fan_in_fan_out", False):
        raise ValueError(f"{name}: fan_in_fan_out (Conv1D-style weights) is not supported")
    if adapter in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(adapter, False):
        raise ValueError(f"{name}: LoRA variants (DoRA, ...) are not supported, only vanilla LoRA")
    if getattr(layer, "lora_bias", {}).get(adapter, False):
        raise ValueError(f"{name}: lora_bias=True is not supported")
    base = layer.get_base_layer()
    if type(base) is not nn.Linear:
        raise ValueError(f"{name}: the base layer must be a plain nn.Linear, got {type(base).__name__}")
    drop = layer.lora_dropout[adapter]
    p = drop.p if isinstance(drop, nn.Dropout) else 0.0
    return LoRALinear.from_factors(base, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight,
                                   layer.scaling[adapter], dropout=p)


def fuse_peft_lora(peft_model: nn.Module) -> nn.Module:
    """Replace each PEFT ``peft.tuners.lora.Linear`` in ``peft_model`` with a fused :class:`LoRALinear`.

    The new layers reuse PEFT's parameter objects (base ``weight``/``bias``, ``lora_A.weight`` as
    ``lora_A``, ``lora_B.weight`` as ``lora_B``) and its ``scaling`` and dropout probability, so outputs
    and gradients match PEFT's (up to floating-point rounding; with dropout, the same RNG draws) and an
    optimizer built on PEFT's parameters keeps working. Supported: one active vanilla LoRA adapter per
    layer on an ``nn.Linear`` base, not merged. PEFT's adapter management (``set_adapter``,
    ``merge_and_unload``, saving adapters by PEFT key names) no longer applies to the swapped layers.

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
    for name, new in new_layers:
        _set_submodule(peft_model, name, new)
    return peft_model
