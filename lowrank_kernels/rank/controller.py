"""``RankController``: adapt the rank of every ``LowRankLinear`` of a model during training.

At every ``interval``-th call of :meth:`RankController.step` (after ``warmup`` calls) it

1. estimates each layer's stable rank ``||U V||_F^2 / sigma_max(U V)^2`` exactly from the factors
   (one batched call over all layers, no ``out x in`` matrix is formed);
2. sets ``target = clamp(safety_factor * stable_rank, min_rank, max_rank)`` and smooths it,
   ``ema <- ema_decay * ema + (1 - ema_decay) * target`` (the EMA starts at the layer's current rank);
3. resizes only when the EMA leaves the hysteresis band ``[rank * (1 - shrink_threshold),
   rank * (1 + grow_threshold)]``, towards ``round(ema)`` by at most ``max_step`` ranks;
4. resizes in place (``LowRankLinear.resize``: same Parameter objects) and carries the optimizer state
   through the change of basis (``state_policy="carry"``, see :mod:`.resize`) or drops it (``"reset"``).

Cost of a decision (what a GPU sees): the stable ranks of all layers come from a fixed number of batched
ops per group of layers of one ``(out, in, dtype, device)`` (see :func:`lowrank_kernels.ops.stable_rank_factored`),
not from ops per layer; the host reads them once (the one sync needed to learn which layers resize, plus the
batched eigensolver's own error check) and takes the decision in Python, so a decision that resizes nothing
costs the same at 12 and at 48 layers. Layers of one shape moving between the same two ranks are resized
together (:func:`.resize.resize_many`: batched factorisations, one multi-tensor copy per group).

Under ``torch.distributed`` the decision is taken on the group's first rank and broadcast, and the
resized factors and their optimizer state are broadcast too (growing draws random directions; one flat
broadcast per dtype), so every rank holds identical ranks and parameters. A ``DistributedDataParallel``
wrapper must be rebuilt after a resize (its reducer caches parameter shapes): see :func:`rewrap_ddp`.
FSDP2 (``fully_shard``) is refused at construction: a resize changes the shape of a sharded parameter,
which FSDP2 cannot take without being applied anew (see :class:`RankController`).
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .. import distributed, ops
from .._checks import check_positive_int
from ..nn.lowrank_linear import LowRankLinear
from .resize import STATE_POLICIES, resize_many, resize_with_state, unwrap_optimizer


@dataclass
class ResizeEvent:
    """One rank change: layer name (as in ``model.named_modules()``), ranks, the estimate behind it, step."""

    layer: str
    old_rank: int
    new_rank: int
    stable_rank: float
    ema: float
    step: int

    def to_dict(self) -> dict:
        return asdict(self)


def _stable_rank_list(layers: list[LowRankLinear]) -> list[float]:
    """Stable ranks of ``U V`` for each layer as Python floats: one batched device computation, one host read."""
    us = [m.U.detach() for m in layers]
    vs = [m.V.detach() for m in layers]
    return ops.stable_rank_factored(us, vs).tolist()


def stable_ranks_of(layers: list[LowRankLinear]) -> torch.Tensor:
    """``(n,)`` fp64 CPU tensor of the stable ranks of ``U V`` for each layer, exact from the factors in one
    batched call (NaN for a layer with a non-finite factor)."""
    return torch.tensor(_stable_rank_list(layers), dtype=torch.float64)


def _unwrap_model(model: nn.Module) -> nn.Module:
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _as_floats(values) -> list[float]:
    """A sequence or 1-D tensor of numbers as Python floats (a tensor is read in one ``tolist``)."""
    if isinstance(values, torch.Tensor):
        return [float(v) for v in values.detach().reshape(-1).tolist()]
    return [float(v) for v in values]


class RankController:
    """Adaptive-rank controller for the ``LowRankLinear`` layers of ``model``.

    Args:
        model: the model (a ``DistributedDataParallel`` wrapper is looked through).
        optimizer: the optimizer training the factors (or None); its state is carried over on resize.
        min_rank / max_rank: bounds for every layer (``max_rank=None``: ``min(in, out)`` of the layer).
        interval: decide every ``interval`` calls of :meth:`step`; ``warmup``: no decision before that many.
        ema_decay: EMA coefficient of the target rank. safety_factor: target = safety_factor * stable rank.
        grow_threshold / shrink_threshold: relative hysteresis band around the current rank.
        max_step: largest rank change per decision. state_policy: ``"carry"`` or ``"reset"``.
        log_file: path of a JSONL file, one line per resize event (written by the first rank only).
        layers: names of the layers to manage (default: every ``LowRankLinear`` in the model).
        process_group: the group whose first rank decides (default: the world).

    Raises ``ValueError`` for a bad argument and, from :meth:`step` / :meth:`estimate`, for a layer whose
    factors hold NaN or Inf (the layer is named). Raises ``RuntimeError`` for a model sharded by FSDP2
    (``fully_shard``, ``DTensor`` parameters): a resize changes the shape of ``U`` and ``V``, and FSDP2 keeps
    flat shards and all-gather buffers sized for the old shapes, so the sharding would have to be undone and
    applied anew around every resize (with the optimizer rebuilt); that is not done here. Use DDP (with
    :func:`rewrap_ddp`), or resize a gathered copy between sharded runs.
    """

    def __init__(self, model: nn.Module, optimizer=None, min_rank: int = 8, max_rank: int | None = None,
                 interval: int = 100, warmup: int = 0, ema_decay: float = 0.8, safety_factor: float = 1.5,
                 grow_threshold: float = 0.1, shrink_threshold: float = 0.2, max_step: int = 4,
                 state_policy: str = "carry", log_file: str | os.PathLike | None = None,
                 layers: list[str] | None = None, process_group=None) -> None:
        check_positive_int(min_rank, "min_rank")
        if max_rank is not None:
            check_positive_int(max_rank, "max_rank")
            if max_rank < min_rank:
                raise ValueError(f"max_rank={max_rank} is smaller than min_rank={min_rank}")
        check_positive_int(interval, "interval")
        check_positive_int(warmup, "warmup", minimum=0)
        check_positive_int(max_step, "max_step")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if not safety_factor > 0:
            raise ValueError(f"safety_factor must be > 0, got {safety_factor}")
        if not grow_threshold >= 0 or not 0 <= shrink_threshold < 1:
            raise ValueError(f"need grow_threshold >= 0 and 0 <= shrink_threshold < 1, got {grow_threshold}, "
                             f"{shrink_threshold}")
        if state_policy not in STATE_POLICIES:
            raise ValueError(f"state_policy must be one of {STATE_POLICIES}, got {state_policy!r}")
        self.model = model
        self.optimizer = unwrap_optimizer(optimizer)
        self.min_rank, self.max_rank, self.interval, self.warmup = min_rank, max_rank, interval, warmup
        self.ema_decay, self.safety_factor, self.max_step = float(ema_decay), float(safety_factor), max_step
        self.grow_threshold, self.shrink_threshold = float(grow_threshold), float(shrink_threshold)
        self.state_policy, self.process_group = state_policy, process_group
        self.log_file = os.fspath(log_file) if log_file is not None else None
        found = OrderedDict((n, m) for n, m in _unwrap_model(model).named_modules() if isinstance(m, LowRankLinear))
        if layers is not None:
            missing = [n for n in layers if n not in found]
            if missing:
                raise ValueError(f"layers not found as LowRankLinear in the model: {missing}")
            found = OrderedDict((n, found[n]) for n in layers)
        if not found:
            raise ValueError("the model has no LowRankLinear layer to control")
        for name, m in found.items():
            sharded = distributed.dtensor_params(m)
            if sharded:
                raise RuntimeError(
                    f"RankController does not support FSDP2/DTensor parameters: layer {name!r} has sharded "
                    f"{sharded}. A resize changes the shapes of U and V, which fully_shard cannot follow without "
                    f"being applied anew; use DDP with rewrap_ddp, or resize an unsharded copy of the model")
        self.layers: OrderedDict[str, LowRankLinear] = found
        self.num_steps = 0
        self.ema: dict[str, float] = {n: float(m.rank) for n, m in found.items()}

    def config(self) -> dict:
        """The constructor's keyword arguments (JSON-friendly; ``model``, ``optimizer`` and ``process_group``
        excluded), so an equal controller can be built on another model: ``RankController(m, opt, **c.config())``."""
        return {"min_rank": self.min_rank, "max_rank": self.max_rank, "interval": self.interval,
                "warmup": self.warmup, "ema_decay": self.ema_decay, "safety_factor": self.safety_factor,
                "grow_threshold": self.grow_threshold, "shrink_threshold": self.shrink_threshold,
                "max_step": self.max_step, "state_policy": self.state_policy, "log_file": self.log_file,
                "layers": list(self.layers)}

    # ------------------------------------------------------------------------------ bounds
    def rank_bounds(self, name: str) -> tuple[int, int]:
        """``(lo, hi)`` allowed ranks of one layer (``hi`` never exceeds ``min(in, out)``)."""
        m = self.layers[name]
        hi = min(m.in_features, m.out_features)
        if self.max_rank is not None:
            hi = min(hi, self.max_rank)
        return min(self.min_rank, hi), hi

    @property
    def ranks(self) -> dict[str, int]:
        return {n: m.rank for n, m in self.layers.items()}

    # ---------------------------------------------------------------------------- decision
    def _estimate_list(self) -> list[float]:
        values = _stable_rank_list(list(self.layers.values()))
        bad = [n for n, v in zip(self.layers, values, strict=True) if not math.isfinite(v)]
        if bad:
            raise ValueError(f"LowRankLinear layers {bad} have NaN or Inf in their factors U/V (their stable rank "
                             f"is not finite); the rank controller cannot decide on them")
        return values

    def estimate(self) -> torch.Tensor:
        """``(n_layers,)`` fp64 stable ranks, in the order of ``self.layers`` (a CPU tensor).

        Raises ``ValueError`` naming the layers whose factors hold NaN or Inf.
        """
        return torch.tensor(self._estimate_list(), dtype=torch.float64)

    def decide(self, stable_ranks) -> dict[str, int]:
        """Update the EMAs with one stable-rank observation per layer; return ``{name: new_rank}`` for the layers
        that must change. ``stable_ranks``: a sequence/tensor in ``self.layers`` order or a ``{name: value}``.
        A non-finite value keeps that layer's target at its current rank."""
        if isinstance(stable_ranks, dict):
            values = [float(stable_ranks[n]) for n in self.layers]
        else:
            values = _as_floats(stable_ranks)
        if len(values) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} stable ranks, got {len(values)}")
        decisions = {}
        for (name, m), sr in zip(self.layers.items(), values, strict=True):
            lo, hi = self.rank_bounds(name)
            target = min(max(self.safety_factor * sr, lo), hi) if math.isfinite(sr) else float(m.rank)
            ema = self.ema_decay * self.ema[name] + (1.0 - self.ema_decay) * target
            self.ema[name] = ema
            r = m.rank
            if r * (1.0 - self.shrink_threshold) <= ema <= r * (1.0 + self.grow_threshold):
                continue  # inside the hysteresis band
            delta = round(ema) - r
            if delta == 0:
                delta = 1 if ema > r else -1
            new = min(max(r + max(-self.max_step, min(self.max_step, delta)), lo), hi)
            if new != r:
                decisions[name] = new
        return decisions

    # ------------------------------------------------------------------------------- apply
    def apply(self, new_ranks: dict[str, int], stable_ranks=None) -> list[ResizeEvent]:
        """Resize the named layers (no EMA update, no interval check): a forced schedule is this call.
        ``stable_ranks`` (same forms as :meth:`decide`) only annotates the events; estimated when None."""
        unknown = [n for n in new_ranks if n not in self.layers]
        if unknown:
            raise ValueError(f"unknown layers: {unknown}")
        if not new_ranks:
            return []
        if stable_ranks is None:
            stable_ranks = self._estimate_list()
        if not isinstance(stable_ranks, dict):
            stable_ranks = dict(zip(self.layers, _as_floats(stable_ranks), strict=True))
        changes = [(name, self.layers[name].rank, int(new)) for name, new in new_ranks.items()
                   if int(new) != self.layers[name].rank]
        for name, _, new in changes:
            m = self.layers[name]
            if not 1 <= new <= min(m.in_features, m.out_features):
                raise ValueError(f"layer {name!r} ({m.in_features} -> {m.out_features}) cannot take rank {new}: "
                                 f"it must lie in [1, {min(m.in_features, m.out_features)}]")
        # layers of one shape and rank change are resized together (a fixed number of batched ops per group)
        resize_many([self.layers[name] for name, _, _ in changes], [new for _, _, new in changes], self.optimizer,
                    self.state_policy)
        events = [ResizeEvent(name, old, new, float(stable_ranks.get(name, float("nan"))), float(self.ema[name]),
                              self.num_steps) for name, old, new in changes]
        active = distributed.is_distributed(self.process_group)
        if active and events:
            self._broadcast_layers([e.layer for e in events])
        if self.log_file is not None and events and distributed.rank(self.process_group) == 0:
            with open(self.log_file, "a", encoding="utf-8") as f:
                for e in events:
                    f.write(json.dumps(e.to_dict()) + "\n")
        return events

    def step(self) -> list[ResizeEvent]:
        """Call once per optimizer step (after ``optimizer.step()``); returns the resize events (often [])."""
        self.num_steps += 1
        if self.num_steps <= self.warmup or self.num_steps % self.interval:
            return []
        group = self.process_group
        if not distributed.is_distributed(group):
            sr = self._estimate_list()
            return self.apply(self.decide(sr), sr)
        # The group's first rank estimates and decides; the others take its floats as they are (exact).
        decision = None
        if distributed.rank(group) == 0:
            try:
                sr = self._estimate_list()
            except ValueError as exc:  # every rank raises it, instead of the others waiting for a broadcast
                decision = {"error": str(exc)}
            else:
                decision = {"sr": sr, "decisions": self.decide(sr), "ema": dict(self.ema)}
        decision = distributed.broadcast_object(decision, distributed.group_src(group), group)
        if "error" in decision:
            raise ValueError(decision["error"])
        self.ema = dict(decision["ema"])
        return self.apply(decision["decisions"], decision["sr"])

    def _broadcast_layers(self, names: list[str]) -> None:
        """Make the resized factors and their optimizer state bit-identical to the group's first rank's."""
        tensors = []
        for name in names:
            m = self.layers[name]
            for p in (m.U, m.V):
                tensors.append(p.data)
                state = self.optimizer.state.get(p, {}) if self.optimizer is not None else {}
                tensors.extend(v for _, v in sorted(state.items(), key=lambda kv: str(kv[0]))
                               if isinstance(v, torch.Tensor) and v.dim() > 0)
        distributed.flat_broadcast(tensors, distributed.group_src(self.process_group), self.process_group)

    # ------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        """Step count, EMAs and current ranks (plain Python values)."""
        return {"num_steps": self.num_steps, "ema": dict(self.ema), "ranks": self.ranks}

    def load_state_dict(self, state: dict) -> None:
        """Restore the counters and resize layers to the saved ranks.

        Call it **before** ``model.load_state_dict`` and ``optimizer.load_state_dict``: the layers get the
        checkpoint's shapes here (their values are then overwritten by the model checkpoint) and their stale
        optimizer state is dropped (the optimizer checkpoint brings the right one).
        """
        missing = [n for n in self.layers if n not in state["ranks"] or n not in state["ema"]]
        if missing:
            raise ValueError(f"controller state has no entry for layers {missing}")
        for name, m in self.layers.items():
            r = int(state["ranks"][name])
            if r != m.rank:
                resize_with_state(m, r, self.optimizer, "reset")
        self.num_steps = int(state["num_steps"])
        self.ema = {n: float(state["ema"][n]) for n in self.layers}


def rewrap_ddp(ddp_model: nn.Module, **overrides) -> nn.Module:
    """A new ``DistributedDataParallel`` around ``ddp_model.module`` after a resize, same settings.

    DDP's reducer holds the parameters' gradient accumulators, which remember the old shapes and would reject
    the new gradients; the old reducer is released first. Use: ``if controller.step(): ddp = rewrap_ddp(ddp)``.
    """
    import gc

    from torch.nn.parallel import DistributedDataParallel as DDP

    if not isinstance(ddp_model, DDP):
        raise TypeError(f"ddp_model must be a DistributedDataParallel, got {type(ddp_model).__name__}")
    kwargs = dict(device_ids=ddp_model.device_ids, output_device=ddp_model.output_device, dim=ddp_model.dim,
                  process_group=ddp_model.process_group,
                  find_unused_parameters=ddp_model.find_unused_parameters,
                  bucket_cap_mb=ddp_model.bucket_bytes_cap / (1024 * 1024),
                  gradient_as_bucket_view=ddp_model.gradient_as_bucket_view, static_graph=ddp_model.static_graph)
    if not ddp_model.broadcast_buffers:  # only when not the default: newer torch deprecates the argument
        kwargs["broadcast_buffers"] = False
    kwargs.update(overrides)
    module = ddp_model.module
    ddp_model.reducer = None
    ddp_model.logger = None
    gc.collect()
    return DDP(module, **kwargs)
