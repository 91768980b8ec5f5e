"""AdamQ3R: AdamW on the task gradient plus the decoupled Q3R step ``p -= lr * G(p)``."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from . import sharded as _sharded
from .config import Q3RConfig
from .operator import Rank
from .regularizer import Q3R


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_hyper(group: Mapping, where: str) -> None:
    """``ValueError`` naming the value and ``where`` unless ``lr``, ``eps``, ``weight_decay`` are finite numbers
    >= 0 and ``betas`` is a pair of finite numbers in [0, 1)."""
    for name, what in (("lr", "learning rate"), ("eps", "eps"), ("weight_decay", "weight_decay")):
        value = group[name]
        if not (_real(value) and value >= 0):
            raise ValueError(f"AdamQ3R: invalid {what}: {name}={value!r} in {where} (a finite number >= 0)")
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(_real(b) and 0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"AdamQ3R: invalid betas: {betas!r} in {where} (two finite numbers, each in [0, 1))")


class AdamQ3R(torch.optim.Optimizer):
    """Adam with decoupled weight decay and the Q3R rank regulariser applied like that decay.

    Per step: the Q3R operators are rebuilt every ``steps`` steps (:meth:`Q3R.update`), then every parameter
    with a gradient gets the AdamW update of ``torch.optim.AdamW`` plus ``-lr * 2 lmbda L X R`` on the
    regularised weights (per slice for fused ones), evaluated at the weights before the step.

    One route on every device, shaped for the GPU: the decay and the Q3R term of all regularised weights go
    through :meth:`Q3R.decoupled_steps_` (operators stacked by shape up to transpose, dtype, device and param
    group: a fixed number of batched launches per stack, the Triton kernel once per stack on CUDA, the same code
    with the PyTorch reference on the CPU), then the Adam part runs as one ``torch._fused_adamw_`` per (param
    group, device, dtype, weight decay), any float dtype, computed in fp32 and stored in the parameter's dtype.
    Nothing depends on the number of layers, and between rebuilds nothing is read on the host: the NaN/Inf
    decision is a flag on the device (as ``torch.amp.GradScaler``'s found-inf) that masks the update, so a step
    between rebuilds can be captured in a CUDA graph.

    Args:
        params: parameters or param groups (``lr``, ``betas``, ``eps``, ``weight_decay`` per group).
        trainable_modules: ``{module: None | [(start, stop), ...]}`` (:func:`extract_linear`); their weights
            must be among ``params``.
        target_rank, lmbda, steps: see :class:`Q3R` (rank fraction of ``min(m, n)``, int, or list per operator);
            required unless ``config`` is given.
        nan_policy: ``"skip"`` (default): when a gradient holds NaN/Inf the step is skipped (parameters, moments
            and Adam step counts unchanged), decided on the device (no host sync) and reported by one
            ``RuntimeWarning`` at the next rebuild (or ``state_dict()``) with the number of steps skipped; the
            Q3R step counter still advances, so rebuilds keep their schedule. A regularised weight holding NaN/Inf
            cannot be rebuilt: the rebuild raises ``ValueError`` naming its operator. ``"raise"``: ``ValueError``
            naming the gradient or weight, checked on the host every step (one sync per step). ``"off"``: no
            check. (With parameters on several devices "skip" is checked on the host, every step.)
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
        _check_hyper(dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay), "the defaults")
        if nan_policy not in ("skip", "raise", "off"):
            raise ValueError(f"nan_policy={nan_policy!r} is not one of ('skip', 'raise', 'off')")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.nan_policy = nan_policy
        self.q3r = Q3R(trainable_modules, target_rank, lmbda, steps=steps, config=config, **q3r_kwargs)
        index = self._index()
        for op in self.q3r.ops:
            if id(op.weight) not in index:
                raise ValueError(f"the weight of Q3R {op.name} is not among the optimizer's params")

    def add_param_group(self, param_group: dict) -> None:
        """As ``torch.optim.Optimizer``'s, and the group's ``lr``, ``betas``, ``eps``, ``weight_decay`` are checked."""
        super().add_param_group(param_group)
        _check_hyper(self.param_groups[-1], f"param group {len(self.param_groups) - 1}")

    def _index(self) -> dict[int, int]:
        return {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}

    def _param_index(self, p: torch.Tensor) -> int:
        return self._index()[id(p)]

    def _first_nonfinite(self, active: list, weights: list[torch.Tensor]) -> str | None:
        """The name of the first gradient of ``active`` ``[(index, param)]`` or weight of ``weights`` holding
        NaN/Inf, None when all are finite (one host sync; names are formed only when one is found)."""
        flags = _sharded.finite_flags([p.grad for _, p in active] + weights)  # agreed over FSDP2 processes
        if all(flags):
            return None
        bad = flags.index(False)
        if bad < len(active):
            i, p = active[bad]
            return f"grad of param {i} {tuple(p.shape)}"
        w = weights[bad - len(active)]
        return f"regularised weight (param {self._index()[id(w)]}) {tuple(w.shape)}"

    def _flags(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The device-side NaN/Inf bookkeeping: ``found`` (this step), ``skipped`` (steps skipped on the device
        since the last host check), ``one`` (the unscale factor of the check)."""
        flags = getattr(self, "_nan_flags", None)
        if flags is None or flags["found"].device != device:
            kw = dict(dtype=torch.float32, device=device)
            flags = self._nan_flags = {"found": torch.zeros((), **kw), "skipped": torch.zeros((), **kw),
                                       "one": torch.ones((), **kw)}
        return flags

    def _report_skipped(self, count: float) -> None:
        if count:
            warnings.warn(f"AdamQ3R: {int(count)} step(s) since the last operator rebuild had a gradient with NaN or "
                          "Inf and were skipped (parameters, moments and step counts unchanged)", RuntimeWarning,
                          stacklevel=3)

    def _flush_skipped(self) -> None:
        """Warn about the steps skipped on the device since the last check (one host read)."""
        flags = getattr(self, "_nan_flags", None)
        if flags is not None:
            count = float(flags["skipped"])
            flags["skipped"].zero_()
            self._report_skipped(count)

    def _init_states(self, params: Sequence[torch.Tensor]) -> None:
        """Zero Adam states for the parameters of ``params`` that have a gradient and none yet: the contiguous
        ones of one device and dtype as views of one zeroed buffer (one launch for all moments and one for all
        step counts, instead of three per parameter), the others (e.g. column-major) as ``zeros_like``."""
        todo = [p for p in params if p.grad is not None and not self.state[p]]
        groups: dict[tuple, list[torch.Tensor]] = {}
        for p in todo:
            if p.is_contiguous() and not _sharded.is_sharded(p):  # FSDP2: DTensor moments (zeros_like)
                groups.setdefault((p.device, p.dtype), []).append(p)
            else:
                self.state[p].update(step=torch.zeros((), dtype=torch.float32, device=p.device),
                                     exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                                     exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format))
        for (device, dtype), members in groups.items():
            total = sum(p.numel() for p in members)
            moments = torch.zeros(2, total, dtype=dtype, device=device)
            steps = torch.zeros(len(members), dtype=torch.float32, device=device)
            off = 0
            for j, p in enumerate(members):
                n = p.numel()
                self.state[p].update(step=steps[j], exp_avg=moments[0, off:off + n].view_as(p),
                                     exp_avg_sq=moments[1, off:off + n].view_as(p))
                off += n

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """One optimizer step; ``closure`` (re-evaluating the loss with gradients) is called first.

        Launches per step are a fixed number per operator stack and per param group, whatever the number of
        layers (see :meth:`Q3R.decoupled_steps_`): the found-inf check (one multi-tensor pass), the Q3R term of
        every stack, then one ``torch._fused_adamw_`` per (param group, device, dtype, weight decay) with the
        found-inf flag, which skips the update on the device. The host reads tensor data only on steps that
        rebuild the operators (every ``steps`` steps: the rebuild's one read of its sigmas, which fetches the count
        of steps skipped since the previous rebuild too), or every step with ``nan_policy="raise"`` or with
        parameters on several devices.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        active = [(i, p) for i, p in enumerate(p for g in self.param_groups for p in g["params"])
                  if p.grad is not None]
        for i, p in active:
            if p.grad.is_sparse:
                raise RuntimeError(f"AdamQ3R does not support sparse gradients (param {i})")
        keep = found = None
        reads: list[torch.Tensor] = []
        if self.nan_policy != "off" and active:
            rebuild = self.q3r.t % self.q3r.steps == 0
            devices = {p.device for _, p in active}
            if len(devices) == 1 and self.nan_policy == "skip":
                # decided on the device: found = any non-finite gradient; the update is masked by it. The count of
                # skipped steps is read by the next rebuild's own host read of its sigmas (Q3R.update(reads=...))
                flags = self._flags(next(iter(devices)))
                found = flags["found"]
                found.zero_()
                torch._amp_foreach_non_finite_check_and_unscale_([p.grad for _, p in active], found, flags["one"])
                flags["skipped"].add_(found)
                keep = torch.rsub(found, 1.0)
                if rebuild:
                    reads = [flags["skipped"]]
            else:
                # "raise", or parameters on several devices: checked on the host, every step
                self._flush_skipped()
                # a non-finite weight only breaks the operator rebuild (the SVD); between rebuilds it stays in its rows
                weights = self.q3r.params if rebuild else []
                bad = self._first_nonfinite(active, weights)
                if bad is not None:
                    if self.nan_policy == "raise":
                        raise ValueError(f"AdamQ3R: the {bad} contains NaN or Inf")
                    warnings.warn(f"AdamQ3R: the {bad} contains NaN or Inf; skipping this step", RuntimeWarning,
                                  stacklevel=2)
                    return loss
        if reads:
            self.q3r.update(reads=reads)
            if self.q3r.last_reads and self.q3r.last_reads[0]:
                reads[0].zero_()
                self._report_skipped(self.q3r.last_reads[0])
        else:
            self.q3r.update()
        group_of = {id(p): gi for gi, g in enumerate(self.param_groups) for p in g["params"] if p.grad is not None}
        settings = {gi: (g["lr"], g["weight_decay"]) for gi, g in enumerate(self.param_groups)}
        # the decay and the Q3R term of every regularised weight with a gradient, at the pre-step weights; the
        # rows' common factor s is left to the fused AdamW kernel's weight-decay pass (weight_decay = (1 - s) / lr)
        deferred = self.q3r.decoupled_steps_(settings, key=lambda w: group_of.get(id(w)), keep=keep,
                                             defer_scale=True)
        regularised = {id(w) for w in self.q3r.params}
        lists: dict[tuple, tuple[list, ...]] = {}
        steps: dict[torch.device, list] = {}
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    self._init_states(group["params"])
                elif state["step"].device != p.device:  # loaded from a state_dict: counts live with the params
                    state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
                # regularised weights were decayed above with their Q3R term, but for a deferred factor s
                if id(p) in deferred:
                    wd = (1.0 - deferred[id(p)]) / group["lr"]
                else:
                    wd = 0.0 if id(p) in regularised else group["weight_decay"]
                entry = lists.setdefault((gi, p.device, p.dtype, wd), ([], [], [], [], []))
                for lst, t in zip(entry, (p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"]),
                                  strict=True):
                    lst.append(t)
                steps.setdefault(p.device, []).append(state["step"])
        for device_steps in steps.values():
            if keep is None:
                torch._foreach_add_(device_steps, 1.0)
            else:  # the list form: the 0-d tensor form reads the scalar on the host
                torch._foreach_add_(device_steps, [keep] * len(device_steps))
        for (gi, _, _, wd), (params, grads, exp_avgs, exp_avg_sqs, step_list) in lists.items():
            group = self.param_groups[gi]
            torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], step_list, lr=group["lr"],
                                beta1=group["betas"][0], beta2=group["betas"][1], weight_decay=wd, eps=group["eps"],
                                amsgrad=False, maximize=False, found_inf=found)
        return loss

    def stats(self) -> list[dict]:
        """:meth:`Q3R.stats` of this optimizer's regulariser: one dict per operator (name, weight, rows,
        target rank, kept count, eps, kept sigma)."""
        return self.q3r.stats()

    def state_dict(self) -> dict:
        self._flush_skipped()  # a checkpoint is a host read anyway: report the steps skipped on the device
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
