"""LoRA linear map: ``lora_matmul``, ``y = x W^T + bias + scaling (dropout(x) A^T) B^T``.

Shapes: ``x (..., in)``, ``W (out, in)``, ``A (r, in)``, ``B (out, r)``, ``bias (out,)``; flattened,
``M`` rows. Three implementations, chosen by ``backend.pick`` (``composed`` unless the committed table
says a measured shape is faster with Triton):

* ``composed`` (default, every device; :func:`lora_matmul_composed`): the big GEMMs stay in cuBLAS and
  the adapter is accumulated in place into their outputs. Forward ``y = addmm(bias, x, W^T)``, then
  ``t = x_d A^T`` (``(M, r)``, ``x_d`` = ``x`` or its dropout) and ``y.addmm_(t, B^T, alpha=scaling)``: one
  ``(M, out)`` tensor, 3 launches. Backward ``u = dy B`` (``(M, r)``), ``dx = dy W``, then
  ``dx.addmm_(u, A, alpha=scaling)``: one ``(M, in)`` tensor; ``dA = scaling u^T x_d`` and
  ``dB = scaling dy^T t`` from the thin ``(M, r)`` products (``addmm`` with ``beta=0``, the scaling in
  the GEMM's alpha); ``dW = dy^T x`` only when ``W.requires_grad`` (a frozen base costs no ``dW`` work),
  ``dbias = sum(dy)`` only when ``bias.requires_grad``. With dropout the mask is drawn once (the
  ``native_dropout`` mask, the same draws as ``F.dropout``) and reused by the backward; the adapter's
  ``dx`` term then needs one more ``(M, in)`` tensor (``(u A) * mask``).
* ``triton`` (``kernels/lora_matmul.py``): one GEMM whose K loop also carries the LoRA term. For
  ``r <= 32`` ``t = x A^T`` is computed on chip in the same K loop; for larger r one thin matmul first,
  then streamed as extra K steps. The backward's ``dx = dy W + scaling (dy B) A`` is the same fused kernel
  with transposed views, which also yields ``u = dy B``; ``dA``, ``dB``, ``dW`` as above. Registered as
  ``torch.ops.lowrank_kernels.lora_matmul`` (+ ``lora_matmul_dx``) with fakes and autograd, so
  ``torch.compile(fullgraph=True)`` traces through it. No dropout, no fp64 (those calls take the composed
  path); bf16 on the CPU (the Triton interpreter's bf16 ``tl.dot`` is wrong) answers with the reference.
* ``torch``: :func:`lora_matmul_ref`, eager ``F.linear`` calls under autograd (the oracle).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import backend
from .._checks import check_output_size, check_same_device_dtype, check_tensor


# ----------------------------------------------------------------------------------------- reference
def lora_matmul_ref(x: torch.Tensor, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                    bias: torch.Tensor | None = None, dropout: float = 0.0) -> torch.Tensor:
    """Pure-PyTorch ``x W^T + bias + scaling (dropout(x) A^T) B^T`` (eager: three matmuls, the order of
    operations and RNG draws of PEFT's ``lora.Linear``); autograd as usual."""
    xa = F.dropout(x, dropout, training=True) if dropout > 0 else x
    return F.linear(x, W, bias) + scaling * F.linear(F.linear(xa, A), B)


# ------------------------------------------------------------------------------ composed (cuBLAS) path
class _LoRAComposed(torch.autograd.Function):
    """2-D core of :func:`lora_matmul_composed`: ``x (M, in)`` -> ``y (M, out)``; see the module docstring."""

    @staticmethod
    def forward(ctx, x, W, A, B, scaling, bias, dropout):
        need_x, need_W, need_A = ctx.needs_input_grad[:3]
        y = torch.mm(x, W.t()) if bias is None else torch.addmm(bias, x, W.t())
        if dropout > 0:
            xa, mask = torch.ops.aten.native_dropout(x, dropout, True)
        else:
            xa, mask = x, None
        t = torch.mm(xa, A.t())  # (M, r)
        y.addmm_(t, B.t(), alpha=scaling)
        ctx.scaling, ctx.dropout = scaling, dropout
        ctx.save_for_backward(x if need_W else None, xa if need_A else None, mask if need_x else None, W, A, B, t)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, xa, mask, W, A, B, t = ctx.saved_tensors
        need_x, need_W, need_A, need_B, _, need_bias, _ = ctx.needs_input_grad
        s = ctx.scaling
        dx = dW = dA = dB = dbias = None
        u = torch.mm(dy, B) if (need_x or need_A) else None  # (M, r)
        if need_x:
            dx = torch.mm(dy, W)  # (M, in): the only (M, in) tensor without dropout
            if mask is None:
                dx.addmm_(u, A, alpha=s)
            else:
                g = torch.mm(u, A).mul_(mask)
                dx.add_(g, alpha=s / (1.0 - ctx.dropout))
        if need_A:
            dA = torch.addmm(A, u.t(), xa, beta=0, alpha=s)  # beta=0: A's values are ignored, not read
        if need_B:
            dB = torch.addmm(B, dy.t(), t, beta=0, alpha=s)
        if need_W:
            dW = torch.mm(dy.t(), x)
        if need_bias:
            dbias = dy.sum(0)
        return dx, dW, dA, dB, None, dbias, None


def lora_matmul_composed(x: torch.Tensor, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                         bias: torch.Tensor | None = None, dropout: float = 0.0) -> torch.Tensor:
    """The cuBLAS-composed ``x W^T + bias + scaling (dropout(x) A^T) B^T`` (no input checks: see
    :func:`lora_matmul`). ``x (..., in)`` -> ``(..., out)``; forward one ``(M, out)`` tensor, backward one
    ``(M, in)`` tensor (without dropout), no ``dW`` work for a frozen ``W``."""
    x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    y = _LoRAComposed.apply(x2, W, A, B, float(scaling), bias, float(dropout))
    return y.view(*x.shape[:-1], W.shape[0])


# ------------------------------------------------------------------------------ custom ops (Triton)
@torch.library.custom_op("lowrank_kernels::lora_matmul", mutates_args=())
def _lora_matmul_op(x: torch.Tensor, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                    bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(y (..., out), t = x A^T (M, r))``; ``t`` is saved for the backward, not differentiable."""
    from ..kernels.lora_matmul import lora_gemm

    x2 = x.reshape(-1, x.shape[-1])
    y, t = lora_gemm(x2, W, A, B, scaling, bias, store_t=True)
    return y.view(*x.shape[:-1], W.shape[0]), t


@_lora_matmul_op.register_fake
def _lora_matmul_fake(x, W, A, B, scaling, bias):
    m = math.prod(x.shape[:-1])
    return x.new_empty((*x.shape[:-1], W.shape[0])), x.new_empty((m, A.shape[0]))


@torch.library.custom_op("lowrank_kernels::lora_matmul_dx", mutates_args=())
def _lora_matmul_dx_op(dy: torch.Tensor, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                       scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``dy (M, out)`` -> ``(dx = dy W + scaling (dy B) A  (M, in), u = dy B  (M, r))`` in one kernel."""
    from ..kernels.lora_matmul import lora_gemm

    # y = x w^T + s (x a^T) b^T with w = W^T (in, out), a = B^T (r, out), b = A^T (in, r): views, no copies.
    return lora_gemm(dy, W.t(), B.t(), A.t(), scaling, None, store_t=True)


@_lora_matmul_dx_op.register_fake
def _lora_matmul_dx_fake(dy, W, A, B, scaling):
    return dy.new_empty((dy.shape[0], W.shape[1])), dy.new_empty((dy.shape[0], A.shape[0]))


def _setup_context(ctx, inputs, output):
    x, W, A, B, scaling, bias = inputs
    _, t = output
    ctx.mark_non_differentiable(t)
    ctx.scaling = scaling
    ctx.x_shape = x.shape
    ctx.save_for_backward(x, W, A, B, t)


def _backward(ctx, dy, _dt):
    x, W, A, B, t = ctx.saved_tensors
    need_x, need_W, need_A, need_B, _, need_bias = ctx.needs_input_grad
    s = ctx.scaling
    dy2 = dy.reshape(-1, W.shape[0])
    x2 = x.reshape(-1, W.shape[1])
    dx = dW = dA = dB = dbias = None
    u = None
    if need_x:
        dx2, u = torch.ops.lowrank_kernels.lora_matmul_dx(dy2, W, A, B, s)
        dx = dx2.view(ctx.x_shape)
    if need_A:
        if u is None:
            u = dy2 @ B
        dA = (u.t() @ x2).mul_(s)
    if need_B:
        dB = (dy2.t() @ t).mul_(s)
    if need_W:
        dW = dy2.t() @ x2
    if need_bias:
        dbias = dy2.sum(0)
    return dx, dW, dA, dB, None, dbias


torch.library.register_autograd("lowrank_kernels::lora_matmul", _backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------- public function
def _check_inputs(x, W, A, B, scaling, bias) -> None:
    check_tensor(x, "x", min_ndim=1)
    check_tensor(W, "W", ndim=2)
    check_tensor(A, "A", ndim=2)
    check_tensor(B, "B", ndim=2)
    if bias is not None:
        check_tensor(bias, "bias", ndim=1)
    check_same_device_dtype({"x": x, "W": W, "A": A, "B": B, "bias": bias})
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling must be a Python float, got {type(scaling).__name__} {scaling!r}")
    if not math.isfinite(scaling):
        raise ValueError(f"scaling must be finite, got {scaling}")
    out_f, in_f = W.shape
    r = A.shape[0]
    if x.shape[-1] != in_f:
        raise ValueError(f"x has {x.shape[-1]} input features (shape {tuple(x.shape)}) but W is {tuple(W.shape)}")
    if r < 1:
        raise ValueError(f"A must have at least one row (rank >= 1), got shape {tuple(A.shape)}")
    if A.shape[1] != in_f:
        raise ValueError(f"A must be (r, in={in_f}), got shape {tuple(A.shape)}")
    if tuple(B.shape) != (out_f, r):
        raise ValueError(f"B must be (out={out_f}, r={r}), got shape {tuple(B.shape)}")
    if bias is not None and bias.shape[0] != out_f:
        raise ValueError(f"bias must be (out={out_f},), got shape {tuple(bias.shape)}")


def lora_matmul(x: torch.Tensor, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                bias: torch.Tensor | None = None, *, dropout: float = 0.0) -> torch.Tensor:
    """``y = x W^T + bias + scaling (dropout(x) A^T) B^T``: a linear layer with a LoRA adapter.

    Args:
        x: ``(..., in)``, any leading dims, any strides.
        W: ``(out, in)`` base weight; its gradient is computed only when ``W.requires_grad``.
        A: ``(r, in)`` LoRA down projection, ``r >= 1``.
        B: ``(out, r)`` LoRA up projection.
        scaling: Python float multiplying the adapter term (``alpha / r`` in LoRA).
        bias: ``(out,)`` or None.
        dropout: probability in ``[0, 1)`` of zeroing an entry of the adapter's input (the base sees ``x``
            unchanged), applied whenever it is > 0: pass 0 in eval mode. One mask per call.

    All tensors share one device and one floating dtype. The implementation is ``backend.pick``'s: the
    cuBLAS-composed path by default (one ``(M, out)`` tensor forward, one ``(M, in)`` backward), the Triton
    kernel where the committed table or ``LOWRANK_KERNELS_BACKEND=triton`` says so, the reference for
    ``LOWRANK_KERNELS_BACKEND=torch``.

    Returns:
        ``(..., out)`` in the dtype of ``x``; differentiable w.r.t. x, W, A, B and bias.

    Raises:
        ValueError: shapes do not match, ``scaling`` is not finite or ``dropout`` is outside ``[0, 1)``.
        TypeError: non-tensor input, non-float dtype, mixed dtypes/devices, or a non-float ``scaling``.
    """
    _check_inputs(x, W, A, B, scaling, bias)
    check_output_size(math.prod(x.shape[:-1]) * W.shape[0], x.dtype, "lora_matmul output (..., out)")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    m = math.prod(x.shape[:-1])
    impl = backend.pick("lora_matmul", x, W, A, B, bias, shape=backend.shape_class(m, *W.shape[::-1], A.shape[0]))
    if impl == "torch":
        return lora_matmul_ref(x, W, A, B, scaling, bias, dropout)
    if impl == "triton" and dropout == 0:
        y, _ = torch.ops.lowrank_kernels.lora_matmul(x, W, A, B, float(scaling), bias)
        return y
    return lora_matmul_composed(x, W, A, B, scaling, bias, dropout)
