"""Factored linear map ``y = (x V^T) U^T + bias``: ``lowrank_matmul``.

Shapes: ``x (..., in)``, ``V (r, in)``, ``U (out, r)``, ``bias (out,)``; flattened, ``M`` rows. Three
implementations, chosen by ``backend.pick`` (``composed`` unless the committed table says a measured
shape is faster with Triton):

* ``composed`` (default, every device; :func:`lowrank_matmul_composed`): ``t = x V^T`` (``(M, r)``), then
  ``y = addmm(bias, t, U^T)``: two cuBLAS calls, one ``(M, out)`` tensor. Autograd's backward is
  ``s = dy U`` (``(M, r)``), ``dx = s V`` (the one ``(M, in)`` tensor), ``dU = dy^T t``, ``dV = s^T x``,
  ``dbias = sum(dy)``, each only when needed.
* ``triton`` (``kernels/lowrank_matmul.py``): one kernel per block of rows builds ``t = x V^T`` in fp32
  registers, then writes ``t U^T + bias`` block by block, so ``t`` never round-trips through memory on the
  way to ``y`` (it is also stored, ``M x r``, for the backward). The backward runs the same kernel on
  ``dy``: ``s = dy U`` on chip, ``dx = s V`` from registers and, in the same pass, the column sums that
  give ``dbias``. ``dU = dy^T t`` and ``dV = s^T x`` are fused into that pass with fp32 atomics for
  ``r <= kernels.lowrank_matmul.FUSE_GRADS_MAX_RANK`` (16; summation order, hence the last bits, is not
  deterministic), else two ``torch.mm`` calls. Registered as the custom ops
  ``lowrank_kernels::lowrank_matmul`` and ``lowrank_kernels::lowrank_matmul_backward`` with fakes and
  autograd, so ``torch.compile(fullgraph=True)`` traces through it. Serves fp32/fp16/bf16 with
  ``1 <= r <= 256`` and non-empty inputs (other calls take the composed path); bf16 on the CPU (the Triton
  interpreter's bf16 ``tl.dot`` is wrong) answers with the reference.
* ``torch``: :func:`lowrank_matmul_ref` (the oracle).
"""

from __future__ import annotations

import math

import torch

from .. import backend
from .._checks import check_output_size, check_same_device_dtype, check_tensor

#: Largest rank the Triton kernel serves (the ``(BLOCK_M, r)`` fp32 accumulator must fit in registers);
#: larger ranks take the composed path.
MAX_TRITON_RANK = 256
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------- reference
def lowrank_matmul_ref(x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None = None,
                       upcast: bool = False) -> torch.Tensor:
    """Pure-PyTorch ``(x V^T) U^T + bias`` (two GEMMs, ``x V^T`` materialised); autograd as usual.

    ``upcast=True`` computes in fp64 and returns fp64 (the oracle for tolerance checks).
    """
    if upcast:
        x, U, V = x.double(), U.double(), V.double()
        bias = None if bias is None else bias.double()
    t = torch.matmul(x, V.t())
    return torch.matmul(t, U.t()) if bias is None else torch.nn.functional.linear(t, U, bias)


def lowrank_matmul_composed(x: torch.Tensor, U: torch.Tensor, V: torch.Tensor,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """The cuBLAS-composed ``(x V^T) U^T + bias`` (no input checks: see :func:`lowrank_matmul`):
    ``t = x V^T`` ``(M, r)``, then ``addmm(bias, t, U^T)``. ``x (..., in)`` -> ``(..., out)``; one
    ``(M, out)`` tensor forward, one ``(M, in)`` tensor backward."""
    x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    t = torch.mm(x2, V.t())
    y = torch.mm(t, U.t()) if bias is None else torch.addmm(bias, t, U.t())
    return y.view(*x.shape[:-1], U.shape[0])


# ------------------------------------------------------------------------------------ Triton custom ops
def _as_2d(x: torch.Tensor) -> torch.Tensor:
    # A 2-D x is handed to the kernel with its strides; higher-rank x is flattened (a copy only when
    # its layout cannot be viewed as 2-D).
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


@torch.library.custom_op("lowrank_kernels::lowrank_matmul", mutates_args=())
def _lowrank_matmul_op(x: torch.Tensor, U: torch.Tensor, V: torch.Tensor,
                       bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels.lowrank_matmul import lowrank_matmul_forward

    y, t = lowrank_matmul_forward(_as_2d(x), U, V, bias)
    return y.view(*x.shape[:-1], U.shape[0]), t


@_lowrank_matmul_op.register_fake
def _(x, U, V, bias):
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return x.new_empty(*x.shape[:-1], U.shape[0]), x.new_empty(m, V.shape[0])


@torch.library.custom_op("lowrank_kernels::lowrank_matmul_backward", mutates_args=())
def _lowrank_matmul_backward_op(dy: torch.Tensor, x: torch.Tensor, U: torch.Tensor, V: torch.Tensor,
                                t: torch.Tensor, need_dx: bool, need_dU: bool, need_dV: bool,
                                need_dbias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(dx, dU, dV, dbias)``; a gradient that is not needed comes back as an empty tensor."""
    from ..kernels.lowrank_matmul import lowrank_matmul_backward

    dy2, x2 = _as_2d(dy), _as_2d(x)
    s, dx, dbias, dU, dV = lowrank_matmul_backward(dy2, x2, U, V, t, need_dx=need_dx, need_dbias=need_dbias,
                                                   fuse_grads=None if (need_dU and need_dV) else False)
    # outputs may not alias each other, so each skipped gradient gets its own empty tensor
    dx = dx.view(x.shape) if need_dx else dy.new_empty(0)
    if need_dU:
        dU = torch.mm(dy2.t(), t) if dU is None else dU
    if need_dV:
        dV = torch.mm(s.t(), x2) if dV is None else dV
    return (dx, dU if need_dU else dy.new_empty(0), dV if need_dV else dy.new_empty(0),
            dbias if need_dbias else dy.new_empty(0))


@_lowrank_matmul_backward_op.register_fake
def _(dy, x, U, V, t, need_dx, need_dU, need_dV, need_dbias):
    def maybe(flag, *shape):
        return dy.new_empty(*shape) if flag else dy.new_empty(0)

    return (maybe(need_dx, *x.shape), maybe(need_dU, *U.shape), maybe(need_dV, *V.shape),
            maybe(need_dbias, U.shape[0]))


def _setup_context(ctx, inputs, output):
    x, U, V, bias = inputs
    _, t = output
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(t)  # t is an internal by-product, saved for the backward only
    ctx.save_for_backward(x, U, V, t)


def _backward(ctx, dy, _dt):
    x, U, V, t = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dbias = ctx.has_bias and need[3]
    dx, dU, dV, dbias = torch.ops.lowrank_kernels.lowrank_matmul_backward(
        dy, x, U, V, t, need[0], need[1], need[2], need_dbias)
    return (dx if need[0] else None, dU if need[1] else None, dV if need[2] else None,
            dbias if need_dbias else None)


_lowrank_matmul_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------- public function
def _autocast(x, U, V, bias):
    """Inside ``torch.autocast`` cast fp32/fp16/bf16 inputs to the autocast dtype, as ``F.linear`` would
    (custom ops get no autocast rule of their own); the casts are differentiable."""
    if not isinstance(x, torch.Tensor) or x.device.type not in ("cpu", "cuda"):
        return x, U, V, bias
    if not torch.is_autocast_enabled(x.device.type):
        return x, U, V, bias
    dtype = torch.get_autocast_dtype(x.device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _TRITON_DTYPES else t
                 for t in (x, U, V, bias))


def _check_inputs(x, U, V, bias) -> None:
    check_tensor(x, "x", min_ndim=1)
    check_tensor(U, "U", ndim=2)
    check_tensor(V, "V", ndim=2)
    if bias is not None:
        check_tensor(bias, "bias", ndim=1)
    check_same_device_dtype({"x": x, "U": U, "V": V, "bias": bias})
    if V.shape[1] != x.shape[-1]:
        raise ValueError(f"V has shape {tuple(V.shape)} but x has in_features={x.shape[-1]} (shape {tuple(x.shape)})")
    if U.shape[1] != V.shape[0]:
        raise ValueError(f"U has shape {tuple(U.shape)} but V has shape {tuple(V.shape)}: ranks differ "
                         f"({U.shape[1]} != {V.shape[0]})")
    if V.shape[0] < 1:
        raise ValueError(f"rank must be >= 1, got V of shape {tuple(V.shape)}")
    if bias is not None and bias.shape[0] != U.shape[0]:
        raise ValueError(f"bias has shape {tuple(bias.shape)} but out_features={U.shape[0]}")


def lowrank_matmul(x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = (x V^T) U^T + bias``, differentiable in ``x``, ``U``, ``V`` and ``bias``.

    Args:
        x: ``(..., in)``, any leading dims, any strides.
        U: ``(out, r)``.
        V: ``(r, in)``.
        bias: ``(out,)`` or ``None``.

    Returns:
        ``(..., out)`` in the dtype of the inputs (all inputs share one dtype and device).

    The implementation is ``backend.pick``'s (see the module docstring): the cuBLAS-composed path by
    default; the Triton kernels (fp32/fp16/bf16, ``1 <= r <= 256``; fp32 ``tl.dot`` uses TF32 exactly when
    ``torch.backends.cuda.matmul.allow_tf32`` is on, like ``torch.matmul``) where the committed table or
    ``LOWRANK_KERNELS_BACKEND=triton`` says so; the reference for ``LOWRANK_KERNELS_BACKEND=torch`` and for
    bf16 CPU tensors with Triton forced. Inside ``torch.autocast`` the inputs are first cast to the
    autocast dtype.
    """
    x, U, V, bias = _autocast(x, U, V, bias)
    _check_inputs(x, U, V, bias)
    check_output_size(math.prod(x.shape[:-1]) * U.shape[0], x.dtype, "lowrank_matmul output (..., out)")
    shape = backend.shape_class(math.prod(x.shape[:-1]), V.shape[1], U.shape[0], V.shape[0])
    impl = backend.pick("lowrank_matmul", x, U, V, bias, shape=shape, triton_dtypes=_TRITON_DTYPES)
    if impl == "torch":
        return lowrank_matmul_ref(x, U, V, bias)
    if impl == "triton" and V.shape[0] <= MAX_TRITON_RANK and x.numel() > 0 and U.shape[0] > 0:
        return torch.ops.lowrank_kernels.lowrank_matmul(x, U, V, bias)[0]
    return lowrank_matmul_composed(x, U, V, bias)
