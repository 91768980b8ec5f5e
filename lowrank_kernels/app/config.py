"""``TrainConfig``: every knob of ``lowrank-kernels train``, from flags, a YAML/JSON file, or a dict."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field

from ..q3r.config import SCHEDULES as Q3R_SCHEDULES
from ..q3r.config import Q3RConfig
from .errors import ConfigError
from .techniques import TECHNIQUES

MODELS = ("vit-tiny", "gpt-tiny")
DEVICES = ("auto", "cpu", "cuda", "mps")
DISTRIBUTED = ("auto", "none", "ddp", "fsdp2")
# techniques that run under torchrun (``distributed`` ddp / fsdp2); the others need one process
DISTRIBUTED_TECHNIQUES = {"ddp": ("adamw", "adamq3r", "controller"), "fsdp2": ("adamw", "adamq3r")}
SCHEDULES = ("cosine", "constant")
EPS_SCHEDULES = Q3R_SCHEDULES


def _f(default, help: str, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


def _q3r(name: str, prefix: str = "", choices=None, default=dataclasses.MISSING):
    """A field whose help (and default, unless ``default`` is given) are those of the library's ``Q3RConfig``
    field ``name``: one source for the library and the command line."""
    spec = {f.name: f for f in dataclasses.fields(Q3RConfig)}[name]
    return _f(spec.default if default is dataclasses.MISSING else default, prefix + spec.metadata["help"], choices)


@dataclass
class TrainConfig:
    """One training run. Defaults train the demo ViT on sklearn digits (dense AdamW)."""

    # model and data
    model: str = _f("vit-tiny", "model", MODELS)
    data: str = _f("digits", "'digits' (vit-tiny), 'synthetic', or a text file path (gpt-tiny)")
    tokenizer: str = _f("char", "text file tokenisation: char or word (whitespace)", ("char", "word"))
    seq_len: int = _f(32, "LM context length (tokens)")
    dim: int = _f(64, "model width")
    depth: int = _f(2, "number of transformer blocks")
    heads: int = _f(4, "attention heads")
    # technique
    technique: str = _f("adamw", "training technique", TECHNIQUES)
    target_modules: str = _f("qkv,proj,fc1,fc2", "comma-separated module names or name suffixes to compress/adapt")
    fuse_qkv: bool = _f(True, "treat qkv as 3 slices (one Q3R operator / truncation per slice)")
    # optimisation
    epochs: int = _f(30, "epochs (ignored when --steps > 0)")
    steps: int = _f(0, "total optimizer steps (0: use --epochs)")
    batch_size: int = _f(32, "batch size")
    lr: float = _f(2e-3, "peak learning rate")
    weight_decay: float = _f(0.05, "decoupled weight decay on matrices")
    beta1: float = _f(0.9, "Adam beta1")
    beta2: float = _f(0.999, "Adam beta2")
    schedule: str = _f("cosine", "learning-rate schedule after linear warm-up", SCHEDULES)
    warmup_frac: float = _f(0.1, "fraction of steps for linear LR warm-up")
    grad_clip: float = _f(1.0, "gradient norm clip (0: off)")
    # Q3R (adamq3r, q3r, lorita-q3r) and truncation
    target_rank: float = _q3r("target_rank", prefix="Q3R and truncation: ")
    lmbda: float = _q3r("lmbda")
    q3r_steps: int = _q3r("steps")
    epsilon_schedule: str = _q3r("epsilon_schedule", choices=EPS_SCHEDULES)
    q3r_N: int = _f(0, "steps of the 'linear' epsilon decay (0: the whole run)")
    eps_min: float = _q3r("eps_min")
    lorita_depth: int = _f(2, "lorita-q3r: factors per target Linear")
    # low rank / LoRA / controller
    rank: int = _f(16, "initial rank (controller), LoRA rank, spectral-lora maximum rank")
    lowrank_init: str = _f("auto", "controller: factors from the SVD of the dense weights (svd: keeps an "
                                   "init_from model), LowRankLinear's own init (native), or auto (svd with init_from, "
                                   "else native)", ("auto", "svd", "native"))
    min_rank: int = _f(4, "controller / spectral-lora minimum rank")
    max_rank: int = _f(0, "controller maximum rank (0: min(in, out))")
    interval: int = _f(50, "controller decision interval (steps)")
    controller_warmup: int = _f(0, "controller: no decision during the first N steps")
    ema_decay: float = _f(0.8, "controller EMA decay")
    safety_factor: float = _f(1.5, "controller target = safety_factor * stable rank")
    max_step: int = _f(4, "controller: largest rank change per decision")
    state_policy: str = _f("carry", "optimizer state on resize", ("carry", "reset"))
    lora_alpha: float = _f(16.0, "LoRA alpha")
    lora_dropout: float = _f(0.0, "LoRA dropout")
    train_head: bool = _f(True, "adapters: also train the classifier / LM head")
    adapter_base: str = _f("auto", "adapters (lora, tenslora, spectral-lora) without init_from: 'pretrain' adapts a "
                                   "base pretrained on classes 0-4 (cached in cache_dir) to classes 5-9, 'random' "
                                   "adapts the randomly initialised model, 'auto' = pretrain on digits, else random",
                           ("auto", "pretrain", "random"))
    pretrain_steps: int = _f(150, "adapters: AdamW steps (batch 64) that pretrain the base on classes 0-4")
    cache_dir: str = _f("", "folder of cached pretrained adapter bases (default: $LOWRANK_KERNELS_CACHE, else "
                            "~/.cache/lowrank-kernels)")
    spectral_percentile: float = _f(0.5, "spectral-lora: fraction of layers that get an adapter")
    tensor_method: str = _f("att_qkv_depth", "tenslora tensorisation method")
    tensor_ranks: str = _f("8_8_8_8_8", "tenslora per-mode ranks")
    core_lr_mult: float = _f(1.0, "tenslora core learning-rate multiplier (TensLoRA+)")
    init_from: str = _f("", "start from a finished run's final_model.pt (or its folder)")
    # run control
    seed: int = _f(0, "seed (model init, data order)")
    device: str = _f("auto", "device", DEVICES)
    distributed: str = _f("auto", "under torchrun: ddp (DistributedDataParallel) or fsdp2 (fully_shard), each "
                                  "process training a disjoint slice of every batch; none: one process; auto: ddp "
                                  "when launched by torchrun with WORLD_SIZE > 1, else none", DISTRIBUTED)
    threads: int = _f(0, "CPU threads for torch (0: torch's default)")
    out: str = _f("runs/run", "output folder (config, log.jsonl, checkpoint.pt, final.json, plots)")
    ckpt_every: int = _f(0, "checkpoint every N steps (0: only at the end)")
    resume: bool = _f(False, "resume from OUT/checkpoint.pt")
    stop_after: int = _f(0, "stop (with a checkpoint) after this many steps; for tests and time budgets")
    rank_every: int = _f(20, "log per-layer ranks every N steps (0: never)")
    progress: bool = _f(True, "tqdm progress bar")
    plots: bool = _f(True, "write PNG plots at the end")

    def __post_init__(self):
        check_types(self)  # values are checked by ``validate`` (``from_dict`` and ``run`` call it)


# fields that may differ between a run and its resumption
# (``distributed``: a resumed run must have the checkpoint's mode and number of processes, which the trainer checks
# against the checkpoint itself, so ``auto`` and the mode it chose are the same run)
RUN_CONTROL = {"device", "threads", "out", "ckpt_every", "resume", "stop_after", "progress", "plots", "cache_dir",
               "distributed"}
_HINTS = typing.get_type_hints(TrainConfig)


def field_type(name: str):
    return _HINTS[name]


def coerce(name: str, value):
    """``value`` converted to the type of field ``name``; ``ConfigError`` naming the key otherwise.

    Integer fields take ints, integral floats (``3.0``) and their strings; ``3.5``, ``nan``, ``inf`` and
    booleans are refused (a value is never rounded). Float fields take finite numbers (not booleans).
    Boolean fields take booleans and ``true/yes/1/false/no/0`` strings.
    """
    if name not in _HINTS:
        raise ConfigError(f"unknown config key {name!r}")
    typ = _HINTS[name]
    try:
        if name == "target_rank":
            return parse_rank(value)
        if typ is bool:
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
                return value.lower() in ("true", "yes", "1")
            if not isinstance(value, bool):
                raise ValueError
            return value
        if typ is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float):
                if not (math.isfinite(value) and value.is_integer()):
                    raise ValueError
                return int(value)
            if isinstance(value, int):
                return value
            if isinstance(value, str):
                return int(value.strip())
            raise ValueError
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            v = float(value)
            if not math.isfinite(v):
                raise ConfigError(f"config key {name!r} must be a finite number, got {value!r}")
            return v
        if name == "target_modules" and isinstance(value, (list, tuple)):
            return ",".join(str(v) for v in value)
        if isinstance(value, (dict, list)):
            raise ValueError
        return str(value)
    except ConfigError:
        raise
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"config key {name!r} must be {_KIND.get(typ, typ.__name__)}, got {value!r}") from None


_KIND = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _type_ok(name: str, value) -> bool:
    typ = _HINTS[name]
    if isinstance(value, bool):
        return typ is bool
    if name == "target_rank":
        return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
    if typ is int:
        return isinstance(value, int)
    if typ is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, typ)


def check_types(cfg: TrainConfig) -> None:
    """Every field holds its type: ints are ``int`` (not ``bool``, not ``3.5``), floats are finite numbers."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if not _type_ok(f.name, v):
            kind = ("an integer or a finite fraction" if f.name == "target_rank" else
                    "a finite number" if _HINTS[f.name] is float else _KIND.get(_HINTS[f.name], "?"))
            raise ConfigError(f"config key {f.name!r} must be {kind}, got {v!r} ({type(v).__name__})")


def parse_rank(value) -> int | float:
    """``"16"`` -> 16 (absolute), ``"0.25"`` -> 0.25 (fraction of min(m, n))."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, (int, float)):
        return value
    s = str(value).strip()
    try:
        return int(s)
    except ValueError:
        return float(s)


def from_dict(d: dict, base: TrainConfig | None = None) -> TrainConfig:
    """A config from ``d`` (unknown keys and bad values raise ``ConfigError``), over ``base`` or the defaults.

    Without ``base``, the keys ``d`` leaves out take the technique's own defaults where it has them
    (``techniques.TECHNIQUE_DEFAULTS``: e.g. a smaller ``lmbda`` for ``q3r``), else the field defaults."""
    cfg = dataclasses.replace(base) if base is not None else TrainConfig()
    if base is None:
        from .techniques import TECHNIQUE_DEFAULTS

        given = {k.replace("-", "_") for k in d}
        technique = d.get("technique")
        for k, v in (TECHNIQUE_DEFAULTS.get(technique, {}) if isinstance(technique, str) else {}).items():
            if k not in given:
                setattr(cfg, k, v)
    for k, v in d.items():
        setattr(cfg, k.replace("-", "_"), coerce(k.replace("-", "_"), v))
    validate(cfg)
    return cfg


def load_file(path: str) -> dict:
    """A YAML or JSON mapping from ``path``."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.endswith(".json"):
            d = json.loads(text)
        else:
            import yaml

            d = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - any parser error is the user's file
        raise ConfigError(f"cannot parse {path!r}: {str(exc).splitlines()[0]}") from None
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path!r} must hold a mapping of config keys, got {type(d).__name__}")
    return d


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: TrainConfig) -> None:
    """Type and value checks that need no model (ranks are checked against the layers by the trainer)."""
    check_types(cfg)
    for f in dataclasses.fields(cfg):
        ch = f.metadata.get("choices")
        v = getattr(cfg, f.name)
        if ch and v not in ch:
            raise ConfigError(f"unknown {f.name} {v!r}: choose from {', '.join(ch)}")
    positive = ["seq_len", "dim", "depth", "heads", "batch_size", "q3r_steps", "lorita_depth", "rank", "min_rank",
                "interval", "max_step", "pretrain_steps"]
    for k in positive:
        _check(getattr(cfg, k) >= 1, f"{k} must be >= 1, got {getattr(cfg, k)}")
    for k in ("steps", "max_rank", "controller_warmup", "threads", "ckpt_every", "stop_after", "rank_every", "q3r_N"):
        _check(getattr(cfg, k) >= 0, f"{k} must be >= 0, got {getattr(cfg, k)}")
    _check(cfg.steps > 0 or cfg.epochs >= 1, f"epochs must be >= 1 (or steps > 0), got {cfg.epochs}")
    _check(cfg.lr > 0, f"lr must be > 0, got {cfg.lr}")
    for k in ("weight_decay", "lmbda", "grad_clip", "eps_min", "lora_alpha", "core_lr_mult"):
        _check(getattr(cfg, k) >= 0, f"{k} must be >= 0, got {getattr(cfg, k)}")
    for k in ("beta1", "beta2", "ema_decay", "lora_dropout", "warmup_frac"):
        _check(0 <= getattr(cfg, k) < 1, f"{k} must be in [0, 1), got {getattr(cfg, k)}")
    _check(0 < cfg.spectral_percentile <= 1, f"spectral_percentile must be in (0, 1], got {cfg.spectral_percentile}")
    _check(cfg.safety_factor > 0, f"safety_factor must be > 0, got {cfg.safety_factor}")
    tr = cfg.target_rank
    if isinstance(tr, float):
        _check(0 < tr < 1, f"target_rank={tr}: a fraction must lie in (0, 1); an int is an absolute rank")
    else:
        _check(tr >= 1, f"target_rank={tr}: an absolute rank must be >= 1")
    _check(cfg.dim % cfg.heads == 0, f"dim={cfg.dim} is not divisible by heads={cfg.heads}")
    _check(not cfg.max_rank or cfg.max_rank >= cfg.min_rank,
           f"max_rank={cfg.max_rank} is smaller than min_rank={cfg.min_rank}")
    _check(bool(cfg.target_modules.strip()), "target_modules is empty")
    _check_distributed(cfg)


def launched_world_size() -> int:
    """The number of processes of this launch: ``torch.distributed``'s group when initialised, else torchrun's
    ``WORLD_SIZE`` (1 without torchrun)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def resolve_distributed(mode: str) -> str:
    """``auto`` -> ``ddp`` when launched with more than one process, else ``none``; other modes unchanged."""
    if mode == "auto":
        return "ddp" if launched_world_size() > 1 else "none"
    return mode


def _check_distributed(cfg: TrainConfig) -> None:
    mode = resolve_distributed(cfg.distributed)
    if mode == "none":
        world = launched_world_size()
        _check(world == 1, f"distributed=none with {world} processes: each would train alone and write the same "
                           f"files; use --distributed ddp or fsdp2 under torchrun, or launch one process")
        return
    if mode == "fsdp2" and cfg.technique == "controller":
        raise ConfigError("technique 'controller' cannot run with distributed=fsdp2: the rank controller resizes the "
                          "factors U and V, and fully_shard cannot follow a change of a sharded parameter's shape; "
                          "use --distributed ddp")
    allowed = DISTRIBUTED_TECHNIQUES[mode]
    if cfg.technique not in allowed:
        raise ConfigError(f"technique {cfg.technique!r} does not run with distributed={mode} (choose from "
                          f"{', '.join(allowed)}, or --distributed none)")
    world = launched_world_size()
    if world < 2:
        raise ConfigError(f"distributed={mode} needs several processes: launch with torchrun --nproc-per-node N "
                          f"-m lowrank_kernels.app train ... (WORLD_SIZE is {world})")
    _check(cfg.batch_size >= world, f"batch_size={cfg.batch_size} is smaller than the {world} processes: every "
                                    f"process needs at least one sample of each batch")


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)
