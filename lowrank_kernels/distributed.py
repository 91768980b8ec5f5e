"""Process-group helpers shared by Q3R/AdamQ3R and the rank controller (the one copy of each).

Generic helpers, usable by anything that owns a list of independent jobs:

* :func:`is_distributed`, :func:`world_size`, :func:`rank`, :func:`group_src` - where this process stands.
* :func:`balanced_assignment` - longest-processing-time greedy: job -> rank, balanced by cost.
* :func:`flat_all_reduce` - one all-reduce per dtype over many tensors, flattened into one buffer.
* :func:`flat_broadcast` - one broadcast per dtype over many tensors, flattened into one buffer.
* :func:`broadcast_object` - a picklable object from ``src`` to every rank.
* :func:`dtensor_params` - the parameters of a module sharded as ``DTensor`` (FSDP2's ``fully_shard``).

All of them are no-ops (or identities) when ``torch.distributed`` is not initialised, so single-process
code calls them unconditionally.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist


def is_distributed(group=None) -> bool:
    """True when ``torch.distributed`` is initialised with more than one rank in ``group``."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group=None) -> int:
    return dist.get_world_size(group) if is_distributed(group) else 1


def rank(group=None) -> int:
    return dist.get_rank(group) if is_distributed(group) else 0


def group_src(group=None) -> int:
    """Global rank of ``group``'s first member (the rank that decides and broadcasts); 0 without a group."""
    if not is_distributed(group) or group is None:
        return 0
    return dist.get_global_rank(group, 0)


def dtensor_params(module: torch.nn.Module) -> list[str]:
    """Names of ``module``'s parameters that are ``DTensor`` (sharded, e.g. by FSDP2's ``fully_shard``)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return []
    return [n for n, p in module.named_parameters() if isinstance(p, DTensor)]


def balanced_assignment(costs: Sequence[float], world_size: int) -> list[int]:
    """Assign job ``i`` (cost ``costs[i]``) to a rank so that the per-rank total cost is balanced.

    Greedy LPT (largest job first onto the least loaded rank; ties broken by the lower job index and
    the lower rank), which is within 4/3 of the optimal makespan. Deterministic: every rank computes the
    same assignment from the same costs without communicating.

    Returns:
        ``owners`` with ``owners[i]`` in ``[0, world_size)``.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    costs = [float(c) for c in costs]
    if any(not c >= 0 for c in costs):
        raise ValueError(f"costs must be finite and >= 0, got {costs}")
    load = [0.0] * world_size
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += costs[i]
    return owners


def flat_all_reduce(tensors: Sequence[torch.Tensor], group=None, op=None) -> None:
    """Sum (or ``op``) every tensor over the ranks, in place, with one collective per dtype.

    The tensors are copied into one flat buffer, reduced, and copied back, which costs one extra copy
    but only one latency per dtype instead of one per tensor.
    """
    if not is_distributed(group) or not tensors:
        return
    op = dist.ReduceOp.SUM if op is None else op
    by_dtype: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault((t.dtype, t.device), []).append(t)
    for ts in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.all_reduce(flat, op=op, group=group)
        offset = 0
        for t in ts:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def flat_broadcast(tensors: Sequence[torch.Tensor], src: int = 0, group=None) -> None:
    """Overwrite every tensor with ``src``'s values, in place, with one broadcast per (dtype, device).

    ``src`` is a global rank. Every rank must pass tensors of the same shapes, dtypes and order (the flat
    buffer's layout). No-op without ``torch.distributed``.
    """
    if not is_distributed(group) or not tensors:
        return
    by_dtype: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault((t.dtype, t.device), []).append(t)
    for ts in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.broadcast(flat, src, group=group)
        offset = 0
        for t in ts:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def broadcast_object(obj: Any, src: int = 0, group=None) -> Any:
    """``obj`` of rank ``src`` (a global rank) on every rank (identity without torch.distributed)."""
    if not is_distributed(group):
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]
