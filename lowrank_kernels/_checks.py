"""Input checks shared by every public function.

Errors follow DESIGN.md: ``ValueError`` for shapes, ranks and arguments, ``TypeError`` for dtype and
device, with the offending value in the message, raised before any kernel launches.

Size limit: no public op takes an input or makes an output of more than :data:`MAX_NUMEL` elements
(``2**34``: 64 GiB in fp32, 128 GiB in fp64, about the memory of the largest single GPU). A larger tensor is
almost always a mistake, typically an ``expand``-ed view (``torch.randn(1, 8).expand(2**40, 8)`` costs no
memory but would need 32 TiB once materialised); it is refused with a ``ValueError`` before anything is
allocated, instead of a multi-terabyte allocation attempt, a ``MemoryError`` or the OOM killer. The limit is
read at each call, so a program that needs more can raise ``lowrank_kernels._checks.MAX_NUMEL``; the compiled
``pad_slices`` op keeps its own fixed copy of it (``kMaxNumel`` in ``csrc/slice_pad/slice_pad.h``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_NUMEL = 2**34


def check_output_size(numel: int, dtype: torch.dtype, what: str) -> None:
    """Refuse (``ValueError``) a tensor of ``numel`` elements above :data:`MAX_NUMEL`, before allocating it.

    ``numel`` is an exact Python int (compute it with ``math.prod`` of the shape, which cannot overflow);
    ``what`` names the tensor and the op in the message.
    """
    if numel > MAX_NUMEL:
        raise ValueError(f"{what}: {numel} elements ({numel * dtype.itemsize / 2**30:.4g} GiB of {dtype}) exceed the "
                         f"limit of {MAX_NUMEL} (lowrank_kernels._checks.MAX_NUMEL); an expand()-ed input?")


def check_tensor(t, name: str, *, ndim: int | None = None, min_ndim: int | None = None) -> torch.Tensor:
    """Check that ``t`` is a floating-point tensor with the expected number of dims."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (fp16/bf16/fp32/fp64), got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")
    check_output_size(t.numel(), t.dtype, f"{name} of shape {tuple(t.shape)}")
    return t


def check_layer_input(x, weight: torch.Tensor, layer: str) -> None:
    """A module's input: a tensor on ``weight``'s device, of ``weight``'s dtype unless autocast is on there.

    ``TypeError`` naming ``layer`` otherwise (``F.linear`` would raise a ``RuntimeError`` about ``mat1``).
    Metadata only: no sync, no kernel.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{layer}: the input must be a torch.Tensor, got {type(x).__name__}")
    if x.device != weight.device:
        raise TypeError(f"{layer}: the input is on {x.device} but the layer's weight is on {weight.device}")
    if x.dtype != weight.dtype and not (x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)):
        raise TypeError(f"{layer}: the input has dtype {x.dtype} but the layer's weight has {weight.dtype} "
                        f"(cast the input, or run under torch.autocast)")


def check_same_device_dtype(named: dict[str, torch.Tensor | None]) -> tuple[torch.device, torch.dtype]:
    """All given (non-None) tensors share one device and one dtype; returns them."""
    items = [(k, v) for k, v in named.items() if v is not None]
    if not items:
        raise ValueError("no tensors given")
    name0, t0 = items[0]
    for name, t in items[1:]:
        if t.device != t0.device:
            raise TypeError(f"{name} is on {t.device} but {name0} is on {t0.device}")
        if t.dtype != t0.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {name0} has dtype {t0.dtype}")
    return t0.device, t0.dtype


def check_finite(t: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` if ``t`` holds NaN or Inf (costs a reduction: use on slow paths only)."""
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def finite_flags(tensors: list[torch.Tensor]) -> list[bool]:
    """Per tensor: whether every element is finite (empty tensors are). One host sync in the common case.

    A 2-norm per tensor (one fused ``_foreach_norm`` pass, fp32 accumulation for fp16/bf16) is NaN/Inf when an
    element is; when a norm is not finite the tensor is checked element by element, because finite values whose
    squares overflow (fp32 1e20) give an infinite norm too. (Max-abs norms, which cannot overflow, measured
    7x slower on the CPU.)
    """
    if not tensors:
        return []
    low = (torch.float16, torch.bfloat16)
    ok: dict[int, bool] = {}
    for half in (False, True):
        idx = [i for i, t in enumerate(tensors) if (t.dtype in low) == half and t.numel()]
        if idx:
            kw = {"dtype": torch.float32} if half else {}
            norms = torch._foreach_norm([tensors[i] for i in idx], **kw)
            groups: dict[tuple, list[int]] = {}  # one stack (and sync) per dtype and device
            for j, n in enumerate(norms):
                groups.setdefault((n.dtype, n.device), []).append(j)
            for js in groups.values():
                for j, flag in zip(js, torch.isfinite(torch.stack([norms[j] for j in js])).tolist(), strict=True):
                    ok[idx[j]] = flag
    flags = []
    for i, t in enumerate(tensors):
        flags.append(ok.get(i, True) or bool(torch.isfinite(t).all()))
    return flags


def check_positive_int(value, name: str, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def normalize_dim(dim: int, ndim: int, name: str = "dim") -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{name} must be an int, got {type(dim).__name__}")
    if not -ndim <= dim < ndim:
        raise ValueError(f"{name}={dim} is out of range for a {ndim}-D tensor")
    return dim % ndim


def as_list(tensors: Iterable[torch.Tensor] | torch.Tensor, name: str) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        raise TypeError(f"{name} must be a list/tuple of tensors, got a single tensor")
    out = list(tensors)
    if not out:
        raise ValueError(f"{name} must not be empty")
    return out
