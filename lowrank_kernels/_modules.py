"""Small rules about model modules, written once and used everywhere.

* :func:`matches_target`: PEFT's ``target_modules`` rule.
* :func:`fused_slices`: the row (output) slices of a fused weight such as QKV.
* :func:`set_submodule`: replace ``model.<dotted name>``.
* :func:`is_conv1d`, :func:`linear_weight`, :func:`is_linear_like`: Linear-or-Conv1D weight access.
  transformers' ``Conv1D`` (GPT-2 family) stores its weight as ``(in, out)``, the transpose of
  ``nn.Linear``'s ``(out, in)``; everything in this library reasons in ``nn.Linear``'s orientation and reads
  such weights through :func:`linear_weight`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

__all__ = ["fused_slices", "is_conv1d", "is_linear_like", "linear_weight", "matches_target", "set_submodule"]


def matches_target(name: str, target_modules: str | Iterable[str] | None) -> bool:
    """PEFT's rule: a string is a regex that must match the whole module name; a list matches a name
    equal to an entry or ending in ``"." + entry``; ``None`` matches everything."""
    if target_modules is None:
        return True
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def fused_slices(name: str, spec: int | Sequence[Sequence[int]], rows: int) -> list[tuple[int, int]]:
    """The ``(start, stop)`` output-row slices of a fused weight with ``rows`` output rows.

    ``spec`` is ``n`` (``n`` equal slices, e.g. 3 for QKV) or an explicit list of ``(start, stop)`` pairs
    (validated: in range, non-empty, non-overlapping). Raises ``ValueError`` naming ``name`` otherwise.
    """
    if isinstance(spec, int) and not isinstance(spec, bool):
        if spec < 1 or rows % spec:
            raise ValueError(f"fused[{name!r}] = {spec}: cannot split {rows} output rows into {spec} equal slices")
        step = rows // spec
        return [(i * step, (i + 1) * step) for i in range(spec)]
    from .ops.pad_slices import normalize_slices  # lazy: ops imports the compiled extension loader

    try:
        return normalize_slices(spec, rows)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"fused[{name!r}]: {exc}") from exc


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """``model.<name> = new`` for a dotted ``name`` (``""`` is refused: the root cannot be replaced in place)."""
    if not name:
        raise ValueError("cannot replace the root module in place; use the returned module instead")
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2 family), whose ``weight`` is ``(in, out)``.

    Checked by class name (of any base class: ``fully_shard`` makes ``FSDPConv1D``) and attributes, so
    transformers need not be importable."""
    return (any(c.__name__ == "Conv1D" for c in type(module).__mro__)
            and isinstance(getattr(module, "weight", None), torch.Tensor)
            and module.weight.dim() == 2 and hasattr(module, "nf"))


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear`` (and subclasses) or transformers' ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a Linear-like module in ``nn.Linear``'s orientation, ``(out, in)``.

    For ``Conv1D`` this is a transposed *view* of the parameter (writes go through to it)."""
    weight = module.weight
    return weight.t() if is_conv1d(module) else weight
