"""``LoRALinear``: a frozen ``nn.Linear`` plus a trainable LoRA adapter, accumulated into the base GEMM's output."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_layer_input, check_positive_int
from ..ops.lora_matmul import lora_matmul


class LoRALinear(nn.Module):
    """``y = base(x) + scaling * (dropout(x) A^T) B^T`` with the base layer frozen.

    Parameters: ``lora_A (r, in_features)`` (Kaiming-uniform init, as PEFT), ``lora_B (out_features, r)``
    (zeros, so a fresh adapter leaves the function unchanged); the base ``weight (out, in)`` and
    ``bias (out,)`` are those of ``base`` (the same tensors, ``requires_grad=False``).
    ``scaling = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``). Input ``(..., in)``, output ``(..., out)``.

    Execution paths of :meth:`forward`:

    * default: :func:`ops.lora_matmul` with ``dropout = p`` in training mode (0 in eval mode): by default
      its cuBLAS-composed path, ``y = addmm(bias, x, W^T)`` then ``y.addmm_(dropout(x) A^T, B^T, alpha=s)``
      (one ``(M, out)`` tensor forward, one ``(M, in)`` tensor backward without dropout, one dropout mask
      drawn once and reused by the backward, no ``dW`` work because the base is frozen); the Triton
      single-GEMM kernel where ``backend.pick`` chooses it (no dropout).
    * inputs whose dtype differs from the adapter's (autocast, fp32 adapters on a bf16 base as PEFT
      makes them): the unfused path, which casts like PEFT does.
    * after :meth:`merge`: only the base ``F.linear`` (the adapter lives inside ``weight``; ``lora_A``
      and ``lora_B`` get no gradient until :meth:`unmerge`).
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        check_positive_int(r, "r")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        w = base.weight
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=w.device, dtype=w.dtype))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters()

    @classmethod
    def from_factors(cls, base: nn.Linear, lora_A: nn.Parameter, lora_B: nn.Parameter, scaling: float,
                     dropout: float = 0.0) -> LoRALinear:
        """Wrap existing adapter parameters (kept as the same objects, no copy) around ``base``.

        ``lora_A (r, in)``, ``lora_B (out, r)``. The ``requires_grad`` flags of ``base`` are left as they are
        (the constructor freezes the base; a converter may want to keep what the user had).
        """
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        r = lora_A.shape[0]
        if lora_A.dim() != 2 or lora_A.shape[1] != base.in_features:
            raise ValueError(f"lora_A must be (r, in={base.in_features}), got {tuple(lora_A.shape)}")
        if tuple(lora_B.shape) != (base.out_features, r):
            raise ValueError(f"lora_B must be (out={base.out_features}, r={r}), got {tuple(lora_B.shape)}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.base = base
        layer.r = r
        layer.scaling = float(scaling)
        layer.alpha = layer.scaling * r
        layer.lora_A = lora_A if isinstance(lora_A, nn.Parameter) else nn.Parameter(lora_A)
        layer.lora_B = lora_B if isinstance(lora_B, nn.Parameter) else nn.Parameter(lora_B)
        layer.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        layer.merged = False
        return layer

    # ------------------------------------------------------------------------------ properties
    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def reset_lora_parameters(self) -> None:
        """``A`` Kaiming-uniform (``a = sqrt(5)``, the ``nn.Linear`` default PEFT also uses), ``B = 0``."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    # --------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_layer_input(x, self.weight, "LoRALinear")
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        same_dtype = x.dtype == self.weight.dtype == self.lora_A.dtype == self.lora_B.dtype
        if not same_dtype or torch.is_autocast_enabled(x.device.type):
            return self._forward_unfused(x)
        p = self.lora_dropout.p if self.training and isinstance(self.lora_dropout, nn.Dropout) else 0.0
        return lora_matmul(x, self.weight, self.lora_A, self.lora_B, self.scaling, self.bias, dropout=p)

    def _forward_unfused(self, x: torch.Tensor) -> torch.Tensor:
        # The same order of operations (and of RNG draws) as peft.tuners.lora.Linear.forward.
        result = F.linear(x, self.weight, self.bias)
        xa = self.lora_dropout(x.to(self.lora_A.dtype))
        return (result + F.linear(F.linear(xa, self.lora_A), self.lora_B) * self.scaling).to(result.dtype)

    # ----------------------------------------------------------------------------- merging
    def delta_weight(self) -> torch.Tensor:
        """``scaling * B A`` ``(out, in)``, formed in fp32 (at least) and returned in the base dtype."""
        dt = torch.promote_types(self.weight.dtype, torch.float32)
        delta = (self.lora_B.detach().to(dt) @ self.lora_A.detach().to(dt)) * self.scaling
        return delta.to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the adapter into the base weight in place; later forwards use only the base GEMM.

        Raises ``RuntimeError`` if already merged.
        """
        if self.merged:
            raise RuntimeError("LoRALinear is already merged")
        self.weight.add_(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the adapter from the base weight again (exact up to one rounding of the base dtype).

        Raises ``RuntimeError`` if not merged.
        """
        if not self.merged:
            raise RuntimeError("LoRALinear is not merged")
        self.weight.sub_(self.delta_weight())
        self.merged = False

    def to_linear(self) -> nn.Linear:
        """A new ``nn.Linear`` with weight ``W + scaling B A`` and the base bias (this module is unchanged)."""
        w = self.weight.detach()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=w.device, dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(w if self.merged else w + self.delta_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias.detach())
        return linear

    def extra_repr(self) -> str:
        p = self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"scaling={self.scaling:g}, dropout={p:g}, merged={self.merged}")
