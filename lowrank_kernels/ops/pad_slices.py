"""Sliced gradient padding for fused layers (QKV): ``pad_slices`` and its inverse ``gather_slices``.

The compiled op ``torch.ops.lowrank_kernels.pad_slices`` (C++ CPU kernel, CUDA kernel) does the work
when the extension loaded; otherwise the PyTorch reference below runs. Both are differentiable
(pad's backward is gather and vice versa) and trace under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .. import _ext, backend
from .._checks import as_list, check_output_size, check_tensor, normalize_dim

Slice = tuple[int, int]
CPP_MAX_NUMEL = 2**34  # kMaxNumel of csrc/slice_pad/slice_pad.h: the compiled op's own, fixed size limit


def normalize_slices(slices: Sequence[Sequence[int]], full_size: int, n: int | None = None) -> list[Slice]:
    """Resolve negative indices and check ``slices`` against an axis of length ``full_size``.

    Raises ``ValueError`` for a slice that is not a pair of ints, reversed or empty, out of range
    after resolving negatives, or overlapping another; and when ``n`` is given, for a count != n.
    """
    if isinstance(full_size, bool) or not isinstance(full_size, int):
        raise TypeError(f"full_size must be an int, got {type(full_size).__name__}")
    if full_size <= 0:
        raise ValueError(f"full_size must be positive, got {full_size}")
    try:
        pairs = [tuple(s) for s in slices]
    except TypeError as exc:
        raise ValueError(f"slices must be a sequence of (start, stop) pairs, got {slices!r}") from exc
    if n is not None and len(pairs) != n:
        raise ValueError(f"got {len(pairs)} slices for {n} tensors")
    if not pairs:
        raise ValueError("slices must not be empty")
    out: list[Slice] = []
    for i, pair in enumerate(pairs):
        if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in pair):
            raise ValueError(f"slice {i} must be a pair of ints (start, stop), got {pair!r}")
        start, stop = pair
        rs = start + full_size if start < 0 else start
        re = stop + full_size if stop < 0 else stop
        if not (0 <= rs < full_size and 0 < re <= full_size):
            raise ValueError(f"slice {i} = {pair} is out of range for size {full_size}")
        if rs >= re:
            raise ValueError(f"slice {i} = {pair} is empty or reversed (resolves to ({rs}, {re}))")
        out.append((rs, re))
    order = sorted(range(len(out)), key=lambda i: out[i][0])
    for a, b in zip(order, order[1:], strict=False):
        if out[b][0] < out[a][1]:
            raise ValueError(f"slices {a} = {pairs[a]} and {b} = {pairs[b]} overlap")
    return out


def _check_grads(grads: list[torch.Tensor], slices: list[Slice], dim: int) -> None:
    g0 = grads[0]
    for i, g in enumerate(grads):
        check_tensor(g, f"grads[{i}]")
        if g.device != g0.device:
            raise TypeError(f"grads[{i}] is on {g.device} but grads[0] is on {g0.device}")
        if g.dtype != g0.dtype:
            raise TypeError(f"grads[{i}] has dtype {g.dtype} but grads[0] has {g0.dtype}")
        if g.dim() != g0.dim():
            raise ValueError(f"grads[{i}] has shape {tuple(g.shape)}, grads[0] has {tuple(g0.shape)}")
        for d in range(g.dim()):
            if d == dim:
                want = slices[i][1] - slices[i][0]
                if g.shape[d] != want:
                    raise ValueError(f"grads[{i}] has size {g.shape[d]} along dim {dim} but its slice "
                                     f"{slices[i]} has {want}")
            elif g.shape[d] != g0.shape[d]:
                raise ValueError(f"grads[{i}] has size {g.shape[d]} along dim {d}, grads[0] has {g0.shape[d]}")


# ----------------------------------------------------------------------------------------- references
def pad_slices_ref(grads: Sequence[torch.Tensor], slices: Sequence[Slice], full_size: int, dim: int = 0):
    """Pure-PyTorch reference of :func:`pad_slices` (slices already normalised)."""
    parts, cursor = [], 0
    for i in sorted(range(len(slices)), key=lambda i: slices[i][0]):
        start, stop = slices[i]
        if start > cursor:
            parts.append(_zeros_like_along(grads[i], dim, start - cursor))
        parts.append(grads[i])
        cursor = stop
    if cursor < full_size:
        parts.append(_zeros_like_along(grads[0], dim, full_size - cursor))
    return torch.cat(parts, dim=dim)


def _zeros_like_along(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = size
    return t.new_zeros(shape)


def gather_slices_ref(full: torch.Tensor, slices: Sequence[Slice], dim: int = 0) -> list[torch.Tensor]:
    """Pure-PyTorch reference of :func:`gather_slices` (slices already normalised)."""
    return [full.narrow(dim, start, stop - start).clone() for start, stop in slices]


# ------------------------------------------------------------- the compiled op's checks, for its fakes
# The same checks, messages and error types as check_slice_list / check_pad_args / check_gather_args in
# csrc/slice_pad/slice_pad_api.cpp (TORCH_CHECK_VALUE -> ValueError, TORCH_CHECK_TYPE -> TypeError), so that
# meta tensors and torch.compile tracing refuse what the real op refuses.
def _cpp_check_slice_list(starts, stops, full_size, n: int) -> None:
    if len(starts) != n or len(stops) != n:
        raise ValueError(f"expected {n} slices, got {len(starts)} starts and {len(stops)} stops")
    for i in range(n):
        if not (0 <= starts[i] and starts[i] < stops[i] and stops[i] <= full_size):
            raise ValueError(f"slice {i} = ({starts[i]}, {stops[i]}) is empty, reversed or outside [0, {full_size})")
    order = sorted(range(n), key=lambda i: starts[i])
    for prev, cur in zip(order, order[1:], strict=False):
        if starts[cur] < stops[prev]:
            raise ValueError(f"slices {prev} = ({starts[prev]}, {stops[prev]}) and {cur} = ({starts[cur]}, "
                             f"{stops[cur]}) overlap")


def _cpp_check_pad_args(grads, starts, stops, full_size, dim) -> None:
    if not grads:
        raise ValueError("pad_slices needs at least one grad")
    if full_size <= 0:
        raise ValueError(f"full_size must be positive, got {full_size}")
    if full_size > CPP_MAX_NUMEL:
        raise ValueError(f"full_size={full_size} exceeds the limit of {CPP_MAX_NUMEL}")
    g0 = grads[0]
    ndim = g0.dim()
    if ndim < 1:
        raise ValueError("grads must have at least 1 dim")
    if not 0 <= dim < ndim:
        raise ValueError(f"dim {dim} out of range for {ndim}-D grads")
    _cpp_check_slice_list(starts, stops, full_size, len(grads))
    for i, g in enumerate(grads):
        if g.device != g0.device:
            raise TypeError(f"grads[{i}] is on {g.device} but grads[0] is on {g0.device}")
        if g.dtype != g0.dtype:
            raise TypeError(f"grads[{i}] has dtype {g.dtype} but grads[0] has {g0.dtype}")
        if g.dim() != ndim:
            raise ValueError(f"grads[{i}] has {g.dim()} dims, grads[0] has {ndim}")
        for d in range(ndim):
            if d == dim and g.shape[d] != stops[i] - starts[i]:
                raise ValueError(f"grads[{i}] has size {g.shape[d]} along dim {dim} but its slice ({starts[i]}, "
                                 f"{stops[i]}) has {stops[i] - starts[i]}")
            if d != dim and g.shape[d] != g0.shape[d]:
                raise ValueError(f"grads[{i}] has size {g.shape[d]} along dim {d} but grads[0] has {g0.shape[d]}")
    numel = full_size * math.prod([g0.shape[d] for d in range(ndim) if d != dim])
    if numel > CPP_MAX_NUMEL:
        raise ValueError(f"pad_slices output of shape {list(g0.shape)} with {full_size} along dim {dim} exceeds "
                         f"the limit of {CPP_MAX_NUMEL} elements")


def _cpp_check_gather_args(full, starts, stops, dim) -> None:
    if full.dim() < 1:
        raise ValueError("full must have at least 1 dim")
    if not 0 <= dim < full.dim():
        raise ValueError(f"dim {dim} out of range for a {full.dim()}-D tensor")
    if not starts:
        raise ValueError("gather_slices needs at least one slice")
    _cpp_check_slice_list(starts, stops, full.shape[dim], len(starts))


# ---------------------------------------------------------------------------- compiled op: fake + grad
if _ext.HAS_EXT:

    @torch.library.register_fake("lowrank_kernels::pad_slices")
    def _pad_slices_fake(grads, starts, stops, full_size, dim):
        _cpp_check_pad_args(grads, starts, stops, full_size, dim)
        shape = list(grads[0].shape)
        shape[dim] = full_size
        return grads[0].new_empty(shape)

    @torch.library.register_fake("lowrank_kernels::gather_slices")
    def _gather_slices_fake(full, starts, stops, dim):
        _cpp_check_gather_args(full, starts, stops, dim)
        outs = []
        for start, stop in zip(starts, stops, strict=True):
            shape = list(full.shape)
            shape[dim] = stop - start
            outs.append(full.new_empty(shape))
        return outs

    def _pad_setup(ctx, inputs, output):
        _, ctx.starts, ctx.stops, _, ctx.dim = inputs

    def _pad_backward(ctx, grad_out):
        grads = torch.ops.lowrank_kernels.gather_slices(grad_out, ctx.starts, ctx.stops, ctx.dim)
        return list(grads), None, None, None, None

    def _gather_setup(ctx, inputs, output):
        full, ctx.starts, ctx.stops, ctx.dim = inputs
        ctx.full_shape = full.shape

    def _gather_backward(ctx, grad_outs):
        template = next(x for x in grad_outs if x is not None)  # unused outputs get no gradient: zeros
        parts = [_zeros_like_along(template, ctx.dim, stop - start) if g is None else g
                 for g, start, stop in zip(grad_outs, ctx.starts, ctx.stops, strict=True)]
        full = torch.ops.lowrank_kernels.pad_slices(parts, ctx.starts, ctx.stops, ctx.full_shape[ctx.dim], ctx.dim)
        return full, None, None, None

    torch.library.register_autograd("lowrank_kernels::pad_slices", _pad_backward, setup_context=_pad_setup)
    torch.library.register_autograd("lowrank_kernels::gather_slices", _gather_backward, setup_context=_gather_setup)


# ------------------------------------------------------------------------------------- public functions
def pad_slices(grads: Sequence[torch.Tensor], slices: Sequence[Sequence[int]], full_size: int,
               dim: int = 0) -> torch.Tensor:
    """Write each ``grads[i]`` into ``[start_i, stop_i)`` along ``dim`` of a zero tensor.

    Args:
        grads: tensors of equal shape except along ``dim``, where ``grads[i]`` has
            ``stop_i - start_i`` entries; same dtype and device. Non-contiguous is fine.
        slices: ``[(start_i, stop_i), ...]``, one per grad; negative indices count from ``full_size``;
            must not overlap.
        full_size: size of the output along ``dim``.
        dim: the sliced dimension (negative allowed).

    Returns:
        a tensor shaped like ``grads[0]`` but with ``full_size`` along ``dim``; rows covered by no
        slice are zero. Differentiable (the backward is :func:`gather_slices`).
    """
    grads = as_list(grads, "grads")
    check_tensor(grads[0], "grads[0]", min_ndim=1)
    d = normalize_dim(dim, grads[0].dim())
    norm = normalize_slices(slices, full_size, n=len(grads))
    _check_grads(grads, norm, d)
    check_output_size(full_size * math.prod([n for i, n in enumerate(grads[0].shape) if i != d]), grads[0].dtype,
                      "pad_slices output")
    if backend.use_extension(*grads):
        return torch.ops.lowrank_kernels.pad_slices(grads, [s for s, _ in norm], [e for _, e in norm], full_size, d)
    return pad_slices_ref(grads, norm, full_size, d)


def gather_slices(full: torch.Tensor, slices: Sequence[Sequence[int]], dim: int = 0) -> list[torch.Tensor]:
    """Inverse of :func:`pad_slices`: ``[full.narrow(dim, start_i, stop_i - start_i)]`` as new tensors.

    Args:
        full: tensor of at least 1 dim.
        slices: non-overlapping ``(start, stop)`` pairs along ``dim`` (negative indices allowed).

    Returns:
        a list of contiguous tensors, one per slice. Differentiable (the backward is :func:`pad_slices`).
    """
    check_tensor(full, "full", min_ndim=1)
    d = normalize_dim(dim, full.dim())
    norm = normalize_slices(slices, full.shape[d])
    if backend.use_extension(full):
        return list(torch.ops.lowrank_kernels.gather_slices(full, [s for s, _ in norm], [e for _, e in norm], d))
    return gather_slices_ref(full, norm, d)
