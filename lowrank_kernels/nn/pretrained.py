"""Save and rebuild Hugging Face models whose layers :func:`replace_linear` made low-rank.

``save_lowrank_pretrained(model, dir)`` runs ``model.save_pretrained(dir)`` and writes ``lowrank_config.json``
beside the weights: for every :class:`LowRankLinear`, its dotted name, rank, ``in_features``, ``out_features``
and whether it has a bias. ``load_lowrank_pretrained(ModelClass, dir)`` builds the dense model from the saved
``config.json``, puts a :class:`LowRankLinear` of the recorded rank at each recorded name and loads the
safetensors weights strictly: every key must be used and every parameter must be loaded (tied weights
excepted), otherwise ``ValueError`` lists the keys. Per-layer ranks may differ (after ``rank`` resizes).
Without ``lowrank_config.json`` (a ``Trainer`` checkpoint) the ranks are read from the ``U``/``V`` shapes;
with it, the file and the shapes must agree.

A plain ``ModelClass.from_pretrained(dir)`` cannot know about the low-rank layers: transformers builds
dense layers and reports their weights as newly initialised. A class whose ``__init__`` calls
``replace_linear`` gets ``from_pretrained`` at the saved ranks, resizes included, by putting
:class:`LowRankPretrainedMixin` first in its bases; :func:`load_lowrank_pretrained` handles every case. A
model object that already has low-rank layers (of any rank) loads such weights with ``load_state_dict``:
:class:`LowRankLinear` resizes itself to the stored rank.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch
from torch import nn

from .._modules import is_linear_like, linear_weight, set_submodule
from .lowrank_linear import LowRankLinear

__all__ = ["LOWRANK_CONFIG_NAME", "LowRankPretrainedMixin", "load_lowrank_pretrained", "lowrank_layers",
           "save_lowrank_pretrained"]

LOWRANK_CONFIG_NAME = "lowrank_config.json"
_FORMAT = "lowrank_kernels.low_rank_layers"
_VERSION = 1


def lowrank_layers(model: nn.Module) -> dict[str, dict]:
    """``{name: {"rank", "in_features", "out_features", "bias"}}`` for every :class:`LowRankLinear` of ``model``
    (a module registered under several names is listed under each)."""
    return {name: {"rank": m.rank, "in_features": m.in_features, "out_features": m.out_features,
                   "bias": m.bias is not None}
            for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, LowRankLinear)}


def save_lowrank_pretrained(model: nn.Module, save_directory: str | os.PathLike, **save_kwargs) -> None:
    """``model.save_pretrained(save_directory, **save_kwargs)`` plus ``lowrank_config.json`` (per-layer ranks).

    Raises:
        TypeError: ``model`` has no ``save_pretrained`` (not a transformers model). ValueError: ``model`` has no
        :class:`LowRankLinear` layer, or ``safe_serialization=False`` was asked for (only safetensors are loaded).
    """
    if not callable(getattr(model, "save_pretrained", None)):
        raise TypeError(f"{type(model).__name__} has no save_pretrained(); for a plain nn.Module save its "
                        "state_dict (LowRankLinear resizes itself when loading one)")
    if save_kwargs.get("safe_serialization", True) is False:
        raise ValueError("safe_serialization=False is not supported: load_lowrank_pretrained reads safetensors only")
    layers = lowrank_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LowRankLinear layer (call replace_linear first)")
    model.save_pretrained(save_directory, **save_kwargs)
    with open(os.path.join(save_directory, LOWRANK_CONFIG_NAME), "w") as f:
        json.dump({"format": _FORMAT, "version": _VERSION, "layers": layers}, f, indent=1, sort_keys=True)


def _read_layers(directory: str) -> dict[str, dict] | None:
    path = os.path.join(directory, LOWRANK_CONFIG_NAME)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or data.get("format") != _FORMAT or data.get("version") != _VERSION:
        raise ValueError(f"{path}: not a lowrank_kernels layer file of version {_VERSION}")
    layers = data.get("layers")
    if not isinstance(layers, dict):
        raise ValueError(f"{path}: 'layers' must be an object, got {type(layers).__name__}")
    for name, spec in layers.items():
        ok = isinstance(spec, dict) and all(isinstance(spec.get(k), int) and not isinstance(spec.get(k), bool)
                                            and spec[k] >= 1 for k in ("rank", "in_features", "out_features"))
        if not ok or not isinstance(spec.get("bias"), bool):
            raise ValueError(f"{path}: layer {name!r} needs positive int rank/in_features/out_features and a bool "
                             f"bias, got {spec!r}")
        if spec["rank"] > min(spec["in_features"], spec["out_features"]):
            raise ValueError(f"{path}: layer {name!r} has rank {spec['rank']} > min(in, out) = "
                             f"{min(spec['in_features'], spec['out_features'])}")
    return layers


def _read_safetensors(directory: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            if os.path.basename(shard) != shard:
                raise ValueError(f"{index}: shard name {shard!r} is not a file name in the directory")
            state.update(load_file(os.path.join(directory, shard)))
        return state
    raise ValueError(f"{directory}: no model.safetensors or model.safetensors.index.json (only safetensors "
                     "checkpoints are loaded, never pickles)")


def _layers_in_tensors(state: dict[str, torch.Tensor]) -> dict[str, dict]:
    """The layer specs that ``<name>.U (out, r)`` / ``<name>.V (r, in)`` pairs of a state dict describe."""
    out = {}
    for key, u in state.items():
        if not key.endswith(".U"):
            continue
        name = key[:-2]
        v = state.get(name + ".V")
        if u.dim() == 2 and isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[0] == u.shape[1]:
            out[name] = {"rank": u.shape[1], "in_features": v.shape[1], "out_features": u.shape[0],
                         "bias": name + ".bias" in state}
    return out


def _build(model_cls_or_factory, directory: str) -> nn.Module:
    if isinstance(model_cls_or_factory, type) and hasattr(model_cls_or_factory, "config_class"):
        config = model_cls_or_factory.config_class.from_pretrained(directory)
        return model_cls_or_factory(config)
    if callable(model_cls_or_factory):
        model = model_cls_or_factory()
        if not isinstance(model, nn.Module):
            raise TypeError(f"the factory returned {type(model).__name__}, not an nn.Module")
        return model
    raise TypeError("model_cls_or_factory must be a transformers model class or a callable returning the model, "
                    f"got {model_cls_or_factory!r}")


def load_lowrank_pretrained(model_cls_or_factory: type | Callable[[], nn.Module], directory: str | os.PathLike,
                            *, dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save_lowrank_pretrained`; returned in eval mode, as ``from_pretrained`` does.

    Args:
        model_cls_or_factory: a transformers model class (built as ``cls(cls.config_class.from_pretrained(dir))``)
            or a callable returning the dense model (``lambda: GPT2LMHeadModel(config)``).
        directory: the saved directory (``config.json`` for a class, ``lowrank_config.json``, safetensors weights).
        dtype: the model is cast to it before loading (default: as built, i.e. ``torch.get_default_dtype()``
            for a class); the saved tensors are converted to the parameters' dtype.

    Raises:
        ValueError: ``lowrank_config.json`` is malformed or disagrees with the factors' shapes; a recorded layer is
        absent from the model or not an ``in -> out`` Linear/Conv1D of the recorded size; keys are missing from
        the checkpoint or left unused (listed in the message). No weight of the returned model is left at its
        random initialisation.

    Without ``lowrank_config.json`` (a ``Trainer`` checkpoint, a plain ``save_pretrained``) the layers are read
    from the ``<name>.U`` / ``<name>.V`` pairs of the weights.
    """
    directory = os.fspath(directory)
    layers = _read_layers(directory)
    state = _read_safetensors(directory)
    inferred = _layers_in_tensors(state)
    recorded = layers is not None
    if not recorded:
        layers = inferred  # e.g. a Trainer checkpoint: the factors' shapes give the ranks
    else:
        for name, spec in layers.items():
            if inferred.get(name) != spec:
                raise ValueError(f"{directory}: {LOWRANK_CONFIG_NAME} records {name} as {spec}, the weights hold "
                                 f"{inferred.get(name, 'no U/V pair')}")
    model = _build(model_cls_or_factory, directory)
    if dtype is not None:
        model.to(dtype)
    all_names: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        all_names.setdefault(id(mod), []).append(name)
    done: set[int] = set()
    for name, spec in layers.items():
        try:
            old = model.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"{LOWRANK_CONFIG_NAME}: layer {name!r} is not in {type(model).__name__}") from exc
        if id(old) in done:
            continue
        if isinstance(old, LowRankLinear):
            w, shape = old.U, (old.out_features, old.in_features)
        elif is_linear_like(old):
            w = linear_weight(old)
            shape = tuple(w.shape)
        elif not recorded:
            continue  # a module of the model's own that holds U and V
        else:
            raise ValueError(f"{LOWRANK_CONFIG_NAME}: {name} is a {type(old).__name__}, not a Linear or Conv1D")
        if shape != (spec["out_features"], spec["in_features"]):
            raise ValueError(f"{LOWRANK_CONFIG_NAME}: {name} is {shape[1]} -> {shape[0]} in the model but "
                             f"{spec['in_features']} -> {spec['out_features']} in the file")
        new = LowRankLinear(spec["in_features"], spec["out_features"], spec["rank"], bias=spec["bias"],
                            device=w.device, dtype=w.dtype)
        for alias in all_names[id(old)]:
            set_submodule(model, alias, new)
        done.add(id(old))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()
    # a tied parameter is saved once: it is loaded when another name of the same tensor was
    loaded_ids = {id(p) for n, p in model.state_dict(keep_vars=True).items() if n in state}
    params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    missing = [k for k in missing if id(params.get(k)) not in loaded_ids]
    if missing or unexpected:
        raise ValueError(f"{directory} does not match {type(model).__name__} with the recorded low-rank layers: "
                         f"missing keys {missing}, unexpected keys {unexpected}")
    return model.eval()


def _saved_keys(directory: str) -> list[str]:
    """The tensor names of a directory's safetensors weights, read from the headers only (``[]`` without any)."""
    from safetensors import safe_open

    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(single):
        with safe_open(single, "pt") as f:
            return list(f.keys())
    if os.path.isfile(index):
        with open(index) as f:
            return list(json.load(f)["weight_map"])
    return []


class LowRankPretrainedMixin:
    """Makes ``from_pretrained`` of a transformers model class restore saved low-rank layers at their saved ranks.

    For a class whose ``__init__`` makes layers low-rank, e.g.::

        class LowRankGPT2(LowRankPretrainedMixin, GPT2LMHeadModel):
            def __init__(self, config):
                super().__init__(config)
                replace_linear(self, rank=16)

    transformers alone builds the layers at the ranks ``__init__`` chooses and refuses a checkpoint saved after
    a resize (it compares shapes before any module code runs). With the mixin first in the bases, a local
    directory whose weights hold low-rank factors (written by :func:`save_lowrank_pretrained`, ``save_pretrained``
    or a ``Trainer`` checkpoint) is loaded by :func:`load_lowrank_pretrained`: every layer at its saved rank,
    strictly (a missing or unused key is a ``ValueError``). Such a directory accepts only ``dtype=``; anything
    else (a hub name, a directory of dense weights) goes to transformers' own ``from_pretrained``, and a
    ``ValueError`` is raised where that would leave low-rank layers at their random initialisation (dense weights
    into a class that makes them low-rank: load the dense class, then call ``replace_linear``).
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        directory = os.fspath(pretrained_model_name_or_path)
        lowrank = os.path.isdir(directory) and (
            os.path.isfile(os.path.join(directory, LOWRANK_CONFIG_NAME))
            or any(k.endswith(".U") for k in _saved_keys(directory)))
        if not lowrank:
            want_info = kwargs.pop("output_loading_info", False)
            model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args,
                                                  output_loading_info=True, **kwargs)
            random = sorted({k.rsplit(".", 1)[0] for k in info.get("missing_keys", ()) if k.endswith((".U", ".V"))})
            if random:
                raise ValueError(f"{pretrained_model_name_or_path} has no low-rank factors for {random}: they would "
                                 f"keep their random initialisation. Load the dense model with its own class, then "
                                 f"call replace_linear (its SVD keeps the trained weights)")
            return (model, info) if want_info else model
        dtype = kwargs.pop("dtype", None)
        if model_args or kwargs:
            raise TypeError(f"{cls.__name__}.from_pretrained of the low-rank directory {directory} accepts only "
                            f"dtype=, got {[*map(repr, model_args), *sorted(kwargs)]}")
        return load_lowrank_pretrained(cls, directory, dtype=dtype)
