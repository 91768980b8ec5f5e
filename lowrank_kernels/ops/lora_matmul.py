"""LoRA linear map with the adapter folded into the base GEMM: ``lora_matmul``.

``y = x W^T + bias + scaling (x A^T) B^T`` with ``x (..., in)``, ``W (out, in)``, ``A (r, in)``,
``B (out, r)``, ``bias (out,)``.

What is fused (Triton backend):

* forward: one GEMM kernel; the LoRA term is extra K steps of the same accumulator (see
  ``kernels/lora_matmul.py``). For ``r <= 32`` ``t = x A^T`` is computed on chip in the same K loop
  (no round trip); for larger r it is one thin matmul first, then streamed as extra K steps.
  ``t`` (``(M, r)``, tiny) is kept for the backward instead of being recomputed.
* backward ``dx = dy W + scaling (dy B) A``: the same fused kernel with transposed views, which also
  yields ``u = dy B``.
* ``dA = scaling u^T x``, ``dB = scaling dy^T t``, ``dW = dy^T x``, ``dbias = sum(dy)``: plain torch
  matmuls/reductions (cuBLAS is already optimal for these reductions over M). ``dW`` is computed only
  when ``W.requires_grad``: for a frozen base there is no ``dW`` work at all.

Registered as ``torch.ops.lowrank_kernels.lora_matmul`` (+ ``lora_matmul_dx`` for the backward) with
fakes and autograd, so ``torch.compile(fullgraph=True)`` traces through it. fp64 inputs, and bf16 on the
CPU (the Triton interpreter's bf16 ``tl.dot`` is wrong), always run the PyTorch reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import backend
from .._checks import check_same_device_dtype, check_tensor


# ----------------------------------------------------------------------------------------- reference
def lora_matmul_ref(x: torch.Tensor, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-PyTorch ``x W^T + bias + scaling (x A^T) B^T`` (eager: three matmuls); autograd as usual."""
    return F.linear(x, W, bias) + scaling * F.linear(F.linear(x, A), B)


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
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x W^T + bias + scaling (x A^T) B^T``: a linear layer with a LoRA adapter, in one GEMM.

    Args:
        x: ``(..., in)``, any leading dims, any strides.
        W: ``(out, in)`` base weight; its gradient is computed only when ``W.requires_grad``.
        A: ``(r, in)`` LoRA down projection, ``r >= 1``.
        B: ``(out, r)`` LoRA up projection.
        scaling: Python float multiplying the adapter term (``alpha / r`` in LoRA).
        bias: ``(out,)`` or None.

    All tensors share one device and one floating dtype (fp32, fp16, bf16; fp64, and bf16 on the CPU, run
    the reference).

    Returns:
        ``(..., out)`` in the dtype of ``x``; differentiable w.r.t. x, W, A, B and bias.

    Raises:
        ValueError: shapes do not match, or ``scaling`` is not finite.
        TypeError: non-tensor input, non-float dtype, mixed dtypes/devices, or a non-float ``scaling``.
    """
    _check_inputs(x, W, A, B, scaling, bias)
    # fp64: no tensor-core path worth a kernel. bf16 on the CPU: the Triton interpreter's bf16 tl.dot
    # returns garbage (measured: errors ~1e10), so the reference answers instead (decided before the
    # backend, so a forced triton backend without the interpreter does not refuse these calls).
    if x.dtype == torch.float64 or (x.dtype == torch.bfloat16 and x.device.type == "cpu"):
        return lora_matmul_ref(x, W, A, B, scaling, bias)
    if backend.choose(x, W, A, B, bias, op="lora_matmul") == "torch":
        return lora_matmul_ref(x, W, A, B, scaling, bias)
    y, _ = torch.ops.lowrank_kernels.lora_matmul(x, W, A, B, float(scaling), bias)
    return y
