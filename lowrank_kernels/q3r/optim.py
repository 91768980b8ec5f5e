"""AdamQ3R: AdamW on the task gradient plus the decoupled Q3R step ``p -= lr * G(p)``."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .. import backend, ops
from .._checks import finite_flags
from ..ops.q3r_apply import _can_fuse_adam
from .operator import Rank
from .config import Q3RConfig
from .regularizer import Q3R
from . import sharded as _sharded


class AdamQ3R(torch.optim.Optimizer):
    """Adam with decoupled weight decay and the Q3R rank regulariser applied like that decay.

    Per step: the Q3R operators are rebuilt every ``steps`` steps (:meth:`Q3R.update`), then every parameter
    with a gradient gets the AdamW update of ``torch.optim.AdamW`` plus ``-lr * 2 lmbda L X R`` on the
    regularised weights (per slice for fused ones), evaluated at the weights before the step. On CUDA each
    parameter goes through one fused :func:`ops.q3r_apply` (the Triton kernel). On the CPU (contiguous fp32/fp64)
    the decay and the Q3R term are applied in place by :meth:`Q3R.decoupled_step_`, then the Adam part of all
    such parameters of a group runs in one call of torch's fused CPU AdamW kernel; other parameters (fp16/bf16,
    non-contiguous) take :func:`ops.q3r_apply`'s reference.

    Args:
        params: parameters or param groups (``lr``, ``betas``, ``eps``, ``weight_decay`` per group).
        trainable_modules: ``{module: None | [(start, stop), ...]}`` (:func:`extract_linear`); their weights
            must be among ``params``.
        target_rank, lmbda, steps: see :class:`Q3R` (rank fraction of ``min(m, n)``, int, or list per operator);
            required unless ``config`` is given.
        nan_policy: ``"skip"`` (default): when a gradient or a regularised weight holds NaN/Inf the whole step
            is skipped (nothing changes, not even the step counters) with a ``RuntimeWarning``; ``"raise"``:
            ``ValueError`` instead; ``"off"``: no check (saves one reduction pass per step).
        config: a :class:`Q3RConfig` (or a mapping of its fields) with the Q3R settings; the keyword arguments
            above and in ``q3r_kwargs`` override its fields.
        q3r_kwargs: forwarded to :class:`Q3R`: any :class:`Q3RConfig` field (``epsilon_schedule``, ``N``,
            ``eps_min``, ``epsilon``, ``oversample``, ``n_iter``, ``warm_start``, ``rebuild_tol``, ``seed``) and
            ``group``.

    ``state_dict()`` holds the Adam moments and every Q3R operator (triplets, eps, counters) keyed by
    parameter index, so a run resumed from it continues identically.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict],
                 trainable_modules: Mapping[nn.Module, Sequence[Sequence[int]] | None] | Iterable[nn.Module],
                 target_rank: Rank | Sequence[Rank] | None = None, lmbda: float | None = None,
                 steps: int | None = None, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 nan_policy: str = "skip", config: Q3RConfig | None = None, **q3r_kwargs):
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
            raise ValueError(f"invalid learning rate: {lr!r}")
        if not (len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"invalid betas: {betas!r} (each in [0, 1))")
        if not eps >= 0:
            raise ValueError(f"invalid eps: {eps!r}")
        if not weight_decay >= 0:
            raise ValueError(f"invalid weight_decay: {weight_decay!r}")
        if nan_policy not in ("skip", "raise", "off"):
            raise ValueError(f"nan_policy={nan_policy!r} is not one of ('skip', 'raise', 'off')")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.nan_policy = nan_policy
        self.q3r = Q3R(trainable_modules, target_rank, lmbda, steps=steps, config=config, **q3r_kwargs)
        index = self._index()
        for op in self.q3r.ops:
            if id(op.weight) not in index:
                raise ValueError(f"the weight of Q3R {op.name} is not among the optimizer's params")

    def _index(self) -> dict[int, int]:
        return {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}

    def _param_index(self, p: torch.Tensor) -> int:
        return self._index()[id(p)]

    def _first_nonfinite(self, active: list[torch.Tensor]) -> str | None:
        tensors = [p.grad for _, p in active]
        # a non-finite weight only breaks the operator rebuild (the SVD); between rebuilds it stays in its own rows
        weights = self.q3r.params if self.q3r.t % self.q3r.steps == 0 else []
        flags = _sharded.finite_flags(tensors + weights)  # agreed over FSDP2 processes
        if all(flags):
            return None
        bad = flags.index(False)  # names are formed only here, not on every step
        if bad < len(active):
            i, p = active[bad]
            return f"grad of param {i} {tuple(p.shape)}"
        w = weights[bad - len(active)]
        return f"regularised weight (param {self._index()[id(w)]}) {tuple(w.shape)}"

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """One optimizer step; ``closure`` (re-evaluating the loss with gradients) is called first."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        active = [(i, p) for i, p in enumerate(p for g in self.param_groups for p in g["params"])
                  if p.grad is not None]
        for i, p in active:
            if p.grad.is_sparse:
                raise RuntimeError(f"AdamQ3R does not support sparse gradients (param {i})")
        if self.nan_policy != "off" and active:
            bad = self._first_nonfinite(active)
            if bad is not None:
                if self.nan_policy == "raise":
                    raise ValueError(f"AdamQ3R: the {bad} contains NaN or Inf")
                warnings.warn(f"AdamQ3R: the {bad} contains NaN or Inf; skipping this step", RuntimeWarning,
                              stacklevel=2)
                return loss
        self.q3r.update()
        regularised = {id(w) for w in self.q3r.params}
        factors = None
        fused: dict[tuple, tuple[list, ...]] = {}
        cpu_fused = backend.requested_backend() != "triton"  # CPU tensors take the reference unless Triton is forced
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                tensors = (p, p.grad, state["exp_avg"], state["exp_avg_sq"])
                if cpu_fused and _can_fuse_adam(*tensors):
                    # CPU: the decay and the Q3R term in place (batched slices, no factors formed), then the Adam
                    # part of every such parameter of the group in one call of torch's fused AdamW kernel
                    wd = group["weight_decay"]
                    if id(p) in regularised:
                        # the common factor s of the decayed rows is left to the fused kernel's weight decay pass
                        s = self.q3r.decoupled_step_(p, group["lr"], wd, defer_scale=True)
                        wd = (1.0 - s) / group["lr"] if s != 1.0 else 0.0
                    lists = fused.setdefault((gi, p.dtype, wd), ([], [], [], [], []))
                    for lst, t in zip(lists, (*tensors, state["step"]), strict=True):
                        lst.append(t)
                    continue
                state["step"] += 1
                if factors is None:
                    factors = self.q3r.factors()
                ops.q3r_apply(p, p.grad, state["exp_avg"], state["exp_avg_sq"], factors.get(p, ()),
                              step=int(state["step"]), lr=group["lr"], betas=group["betas"], eps=group["eps"],
                              weight_decay=group["weight_decay"], lmbda=self.q3r.lmbda)
        for (gi, _, wd), (params, grads, exp_avgs, exp_avg_sqs, steps) in fused.items():
            group = self.param_groups[gi]
            torch._foreach_add_(steps, 1)
            torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=group["lr"],
                                beta1=group["betas"][0], beta2=group["betas"][1], weight_decay=wd, eps=group["eps"],
                                amsgrad=False, maximize=False)
        return loss

    def stats(self) -> list[dict]:
        """:meth:`Q3R.stats` of this optimizer's regulariser: one dict per operator (name, weight, rows,
        target rank, kept count, eps, kept sigma)."""
        return self.q3r.stats()

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["q3r"] = self.q3r.state_dict(param_index=self._param_index)
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        q3r_state = state_dict.pop("q3r", None)
        if q3r_state is None:
            raise ValueError("state_dict has no 'q3r' entry: it was not saved by AdamQ3R")
        self.q3r.check_state_dict(q3r_state, param_index=self._param_index)
        super().load_state_dict(state_dict)
        self.q3r.load_state_dict(q3r_state, param_index=self._param_index)
