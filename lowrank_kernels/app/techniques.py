"""The training techniques of ``lowrank-kernels train``: model surgery, optimizer, regulariser, controller.

A :class:`Technique` owns everything the training loop must step and checkpoint besides the model. Each
technique needs some part of the library; when that part is missing :class:`TechniqueUnavailable` says so.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from .._modules import matches_target, set_submodule
from .errors import ConfigError

TECHNIQUES = ("adamw", "adamq3r", "q3r", "lorita-q3r", "controller", "lora", "tenslora", "spectral-lora")

# one line each, printed by ``lowrank-kernels techniques``
DESCRIPTIONS = {
    "adamw": "dense AdamW, the baseline (no rank regularisation)",
    "adamq3r": "AdamW + the Q3R rank regulariser as a decoupled step inside the optimizer (AdamQ3R)",
    "q3r": "AdamW on loss + Q3R value (the regulariser in the loss, as the upstream Q3R code does)",
    "lorita-q3r": "each target Linear trained as a product of --lorita-depth factors (LoRITa), Q3R on the product",
    "controller": "LowRankLinear factors U V whose ranks a RankController adapts from their stable ranks",
    "lora": "frozen pretrained base + trainable LoRA adapters of rank --rank on the targets",
    "tenslora": "frozen pretrained base + TensLoRA tensor adapters shared over Q/K/V and depth (Marmoret et al.)",
    "spectral-lora": "frozen pretrained base + LoRA on the heavy-tailed layers, HT-SR ranks (Adaptive-Rank-LoRA)",
}

# techniques that train adapters on a frozen base; on an image task they adapt a pretrained base by default
ADAPTERS = ("lora", "tenslora", "spectral-lora")

# Defaults that differ per technique, applied by ``config.from_dict`` to the keys a user did not give.
# q3r / lorita-q3r put Q3R's value in the loss: its gradient 2 lmbda L X R acts like an L2 penalty on the whole
# flat spectrum of a fresh init, which Adam's normalisation turns into a full-size step, so lmbda must be small
# (0.1 keeps the demo ViT at chance in 3 epochs; 1e-3 trains). AdamQ3R's decoupled step lr * 2 lmbda L X R is
# not normalised, hence its larger lmbda. The LoRITa product leaves the initial plateau later and more randomly
# than a plain Linear (3 epochs of digits at batch 32: 0.33-0.62 over seeds); batch 16 doubles its steps.
# Adapters train few parameters from a pretrained base: a larger lr, no weight decay (as LoRA recipes).
TECHNIQUE_DEFAULTS: dict[str, dict] = {
    "q3r": {"lmbda": 1e-3},
    "lorita-q3r": {"lmbda": 1e-3, "batch_size": 16},
    "lora": {"lr": 5e-3, "weight_decay": 0.0},
    "tenslora": {"lr": 5e-3, "weight_decay": 0.0},
    "spectral-lora": {"lr": 5e-3, "weight_decay": 0.0},
}

# what each technique imports: (module, attribute)
_NEEDS = {
    "adamw": [],
    "adamq3r": [("lowrank_kernels.q3r", "AdamQ3R"), ("lowrank_kernels.q3r", "extract_linear")],
    "q3r": [("lowrank_kernels.q3r", "Q3R"), ("lowrank_kernels.q3r", "extract_linear")],
    "lorita-q3r": [("lowrank_kernels.q3r", "Q3R")],
    "controller": [("lowrank_kernels.nn", "replace_linear"), ("lowrank_kernels.rank", "RankController")],
    "lora": [("lowrank_kernels.nn", "LoRALinear")],
    "tenslora": [("lowrank_kernels.adapters.tenslora", "apply_tenslora")],
    "spectral-lora": [("lowrank_kernels.adapters.spectral", "spectral_table"), ("lowrank_kernels.nn", "LoRALinear")],
}


class TechniqueUnavailable(ConfigError):
    """The technique's building block is not part of this installation."""


def _need(module: str, attr: str, technique: str):
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise TechniqueUnavailable(f"technique {technique!r} is unavailable: {module}.{attr} is missing from this "
                                   f"build ({type(exc).__name__}: {exc})") from None


def availability() -> dict[str, str | None]:
    """``{technique: None if available else the reason}``."""
    out = {}
    for t, needs in _NEEDS.items():
        try:
            for mod, attr in needs:
                _need(mod, attr, t)
            out[t] = None
        except TechniqueUnavailable as exc:
            out[t] = str(exc)
    return out


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (Linear weights, factors, adapters, embeddings); not biases, norms, position tables."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() == 2 and "pos_embed" not in name else rest).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if rest:
        groups.append({"params": rest, "weight_decay": 0.0})
    return groups


class Technique:
    """Holds ``optimizer`` (+ optional ``q3r`` regulariser / ``controller``) for one training run."""

    def __init__(self, cfg, model: nn.Module, targets: list[str], fused: dict[str, int], total_steps: int):
        self.name, self.cfg, self.model, self.targets, self.fused = cfg.technique, cfg, model, targets, fused
        self.regularizer = None  # object with .loss() -> tensor, .value, state_dict()
        self.controller = None
        if self.name not in TECHNIQUES:
            raise ConfigError(f"unknown technique {self.name!r} (choose from {', '.join(TECHNIQUES)})")
        for mod, attr in _NEEDS[self.name]:
            _need(mod, attr, self.name)
        getattr(self, "_setup_" + self.name.replace("-", "_"))(total_steps)

    # ------------------------------------------------------------------------------------ set-ups
    def _q3r_kwargs(self, total_steps: int) -> dict:
        c = self.cfg
        kw = dict(target_rank=c.target_rank, lmbda=c.lmbda, steps=c.q3r_steps, epsilon_schedule=c.epsilon_schedule,
                  seed=c.seed)
        if c.epsilon_schedule == "linear":
            kw.update(N=c.q3r_N or total_steps, eps_min=c.eps_min)
        return kw

    def _fused_map(self) -> dict[str, int]:
        return {k: v for k, v in self.fused.items() if any(matches_target(t, [k]) for t in self.targets)}

    def _adamw(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(param_groups(self.model, self.cfg.weight_decay), lr=self.cfg.lr,
                                 betas=(self.cfg.beta1, self.cfg.beta2))

    def _setup_adamw(self, total_steps: int) -> None:
        self.optimizer = self._adamw()

    def _setup_adamq3r(self, total_steps: int) -> None:
        from ..q3r import AdamQ3R, extract_linear

        mods = extract_linear(self.model, self.targets, fused=self._fused_map())
        self.optimizer = AdamQ3R(param_groups(self.model, self.cfg.weight_decay), trainable_modules=mods,
                                 lr=self.cfg.lr, betas=(self.cfg.beta1, self.cfg.beta2),
                                 **self._q3r_kwargs(total_steps))

    def _setup_q3r(self, total_steps: int) -> None:
        from ..q3r import Q3R, extract_linear

        self.optimizer = self._adamw()
        q3r = Q3R(extract_linear(self.model, self.targets, fused=self._fused_map()), **self._q3r_kwargs(total_steps))
        self.regularizer = _PlainQ3R(q3r)

    def _setup_lorita_q3r(self, total_steps: int) -> None:
        from ..q3r.lorita import ComposedQ3R, apply_lorita

        layers = apply_lorita(self.model, self.targets, self.cfg.lorita_depth)
        self.regularizer = ComposedQ3R(layers, self._fused_map(), **self._q3r_kwargs(total_steps))
        self.optimizer = self._adamw()

    def _setup_controller(self, total_steps: int) -> None:
        from ..nn import replace_linear
        from ..rank import RankController

        c = self.cfg
        replace_linear(self.model, rank=c.rank, target_modules=self.targets)
        # from scratch the SVD of a std-0.02 init gives small factors whose product learns slowly: on the demo
        # (3 seeds) native init reached 0.94-0.95 test accuracy where the SVD init gave 0.61-0.94
        if c.lowrank_init == "native" or (c.lowrank_init == "auto" and not c.init_from):
            for name in self.targets:
                self.model.get_submodule(name).reset_parameters()
        self.optimizer = self._adamw()
        self.controller = RankController(self.model, self.optimizer, min_rank=c.min_rank, max_rank=c.max_rank or None,
                                         interval=c.interval, warmup=c.controller_warmup, ema_decay=c.ema_decay,
                                         safety_factor=c.safety_factor, max_step=c.max_step,
                                         state_policy=c.state_policy, layers=list(self.targets))

    def _wrap_lora(self, ranks: dict[str, int], alphas: dict[str, float]) -> None:
        from ..nn import LoRALinear

        for p in self.model.parameters():
            p.requires_grad_(False)
        for name, r in ranks.items():
            set_submodule(self.model, name, LoRALinear(self.model.get_submodule(name), r=r, alpha=alphas[name],
                                                       dropout=self.cfg.lora_dropout))
        self._train_head()

    def _train_head(self) -> None:
        if self.cfg.train_head:
            for name in ("head", "lm_head"):
                if hasattr(self.model, name):
                    for p in getattr(self.model, name).parameters():
                        p.requires_grad_(True)

    def _setup_lora(self, total_steps: int) -> None:
        self._wrap_lora({n: self.cfg.rank for n in self.targets}, {n: self.cfg.lora_alpha for n in self.targets})
        self.optimizer = self._adamw()

    def _setup_spectral_lora(self, total_steps: int) -> None:
        from ..adapters.spectral import spectral_table

        c = self.cfg
        rows = spectral_table(self.model, target_modules=list(self.targets), minimum_rank=c.min_rank,
                              maximum_rank=max(c.rank, c.min_rank), layer_selection_percentile=c.spectral_percentile)
        sel = [r for r in rows if r.selected]
        self._wrap_lora({r.name: r.rank for r in sel}, {r.name: r.lora_alpha for r in sel})
        self.optimizer = self._adamw()

    def _setup_tenslora(self, total_steps: int) -> None:
        from ..adapters import tenslora, tenslora_plus

        c = self.cfg
        for p in self.model.parameters():
            p.requires_grad_(False)
        tenslora.apply_tenslora(self.model, method=c.tensor_method, ranks=c.tensor_ranks)
        for name, mod in self.model.named_modules():  # measure (and densify) every adapted layer
            if isinstance(mod, tenslora.TensLoRALinear) and name not in self.targets:
                self.targets.append(name)
        self._train_head()
        groups = tenslora_plus.param_groups(self.model, lr=c.lr, core_mult=c.core_lr_mult)
        self.optimizer = torch.optim.AdamW(groups, lr=c.lr, betas=(c.beta1, c.beta2), weight_decay=c.weight_decay)

    # ----------------------------------------------------------------------------------- stepping
    def extra_loss(self) -> torch.Tensor | None:
        return None if self.regularizer is None else self.regularizer.loss()

    def after_step(self) -> list[dict]:
        if self.controller is None:
            return []
        return [e.to_dict() for e in self.controller.step()]

    def reg_value(self) -> float | None:
        """The regulariser's value at the last step (Q3R in the loss, LoRITa + Q3R); None otherwise."""
        return None if self.regularizer is None else self.regularizer.value

    def inference_model(self) -> nn.Module:
        """The model as deployed: LoRITa products composed into one Linear each."""
        if self.name == "lorita-q3r":
            import copy

            from ..q3r.lorita import compose_lorita

            return compose_lorita(copy.deepcopy(self.model))
        return self.model

    def state_dict(self) -> dict:
        return {"regularizer": None if self.regularizer is None else self.regularizer.state_dict(),
                "controller": None if self.controller is None else self.controller.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Call before loading the model and optimizer states (the controller resizes layers here)."""
        if self.controller is not None and state.get("controller") is not None:
            self.controller.load_state_dict(state["controller"])
        if self.regularizer is not None and state.get("regularizer") is not None:
            self.regularizer.load_state_dict(state["regularizer"])


class _PlainQ3R:
    """Q3R added to the loss (``loss + q3r.val``) with an ordinary optimizer."""

    def __init__(self, q3r):
        self.q3r, self.value = q3r, 0.0

    def loss(self) -> torch.Tensor:
        self.q3r.update()
        val = self.q3r.val
        self.value = float(val.detach())
        return val

    def state_dict(self) -> dict:
        return self.q3r.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.q3r.load_state_dict(state)
