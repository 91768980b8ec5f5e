"""LoRITa over-parameterisation with Q3R on the composed weight (the upstream Q3R code's ``LoRITaQuaRS`` technique).

During training a target ``nn.Linear`` ``W (out, in)`` is a product of ``depth`` factors
``W = W_1 W_2 ... W_depth`` with ``W_1 (out, in)`` and ``W_k (in, in)`` for ``k >= 2``. Weight decay on the
factors acts on ``W`` like a Schatten quasi-norm, an implicit push towards low rank; Q3R acts on the composed
``W``. For inference the product is composed back into one ``nn.Linear`` (:func:`compose_lorita`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._modules import fused_slices, matches_target, set_submodule


class LoRITaLinear(nn.Module):
    """``y = x (W_1 ... W_depth)^T + bias``; initialised so that the product equals ``base.weight``."""

    def __init__(self, base: nn.Linear, depth: int):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.in_features, self.out_features, self.depth = base.in_features, base.out_features, depth
        w = base.weight.detach()
        eye = torch.eye(self.in_features, dtype=w.dtype, device=w.device)
        # identity trailing factors: the over-parameterised layer starts as the dense layer it replaces
        self.factors = nn.ParameterList([nn.Parameter(w.clone())] +
                                        [nn.Parameter(eye.clone()) for _ in range(depth - 1)])
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone())

    def composed_weight(self) -> torch.Tensor:
        """The product ``W_1 ... W_depth`` (out, in), differentiable in every factor."""
        w = self.factors[0]
        for f in self.factors[1:]:
            w = w @ f
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.composed_weight(), self.bias)

    def to_linear(self) -> nn.Linear:
        w = self.factors[0]
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device,
                        dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.composed_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, depth={self.depth}"


def apply_lorita(model: nn.Module, names: list[str], depth: int) -> dict[str, LoRITaLinear]:
    """Replace each named ``nn.Linear`` by a :class:`LoRITaLinear` in place; returns ``{name: layer}``."""
    out = {}
    for name in names:
        base = model.get_submodule(name)
        if not isinstance(base, nn.Linear):
            raise ValueError(f"LoRITa target {name!r} is a {type(base).__name__}, not an nn.Linear")
        out[name] = LoRITaLinear(base, depth)
        set_submodule(model, name, out[name])
    return out


def compose_lorita(model: nn.Module) -> nn.Module:
    """Replace every :class:`LoRITaLinear` by its composed ``nn.Linear`` in place (for inference)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, LoRITaLinear):
            set_submodule(model, name, mod.to_linear())
    return model


class ComposedQ3R:
    """Q3R on the composed weights of LoRITa layers.

    :class:`~lowrank_kernels.q3r.Q3R` keeps a reference to each weight tensor, so it is built on detached
    *shadow* copies of the composed weights, refreshed before every operator update. The regulariser enters
    the loss as ``sum <W(factors), G>`` with ``G = dQ/dW`` at the current weight: its gradient with respect
    to the factors is exactly the chain rule through the product (the operator being fixed between
    refreshes, as in Q3R itself). The upstream LoRITa+Q3R instead adds a non-differentiable value to the loss, so
    its factors train as under plain Adam.

    ``q3r_kwargs`` are :class:`~lowrank_kernels.q3r.Q3R`'s (any :class:`~lowrank_kernels.q3r.Q3RConfig` field, or
    ``config=``); :meth:`stats` names the operators by the layer names.
    """

    def __init__(self, layers: dict[str, LoRITaLinear], fused: dict[str, int], **q3r_kwargs):
        from .regularizer import Q3R, TargetMap

        self.layers = layers
        self.shadows = {name: layer.composed_weight().detach().clone() for name, layer in layers.items()}
        mods = TargetMap()  # with the layer names, for messages and Q3R.stats()
        for name, w in self.shadows.items():
            holder = nn.Module()
            holder.weight = w  # a plain attribute: Q3R only reads ``.weight``
            spec = next((v for k, v in fused.items() if matches_target(name, [k])), None)
            mods[holder] = None if spec is None else fused_slices(name, spec, w.shape[0])
            mods.names[holder] = name
        self.q3r = Q3R(mods, **q3r_kwargs)
        self.value = 0.0

    def loss(self) -> torch.Tensor:
        """Refresh the shadows, count one Q3R step, return the surrogate whose gradient is ``dQ/dfactors``."""
        composed = {name: layer.composed_weight() for name, layer in self.layers.items()}
        with torch.no_grad():
            for name, w in composed.items():
                self.shadows[name].copy_(w)
        self.q3r.update()
        grads = self.q3r.grad
        self.value = float(self.q3r.val.detach())
        return sum((composed[name] * grads[w].detach()).sum() for name, w in self.shadows.items())

    def stats(self) -> list[dict]:
        """:meth:`Q3R.stats` of the composed weights (``weight`` is the detached shadow copy)."""
        return self.q3r.stats()

    def state_dict(self) -> dict:
        return self.q3r.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.q3r.load_state_dict(state)
