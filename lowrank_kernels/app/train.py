"""The training loop behind ``lowrank-kernels train`` (and ``demo`` / ``sweep``).

``run(cfg)`` trains one :class:`TrainConfig` and writes into ``cfg.out``:

* ``config.json``; ``log.jsonl``: one line per step (loss, lr, regulariser, ranks every ``rank_every`` steps,
  controller resize events) and one per evaluation;
* ``checkpoint.pt`` every ``ckpt_every`` steps and at the end: model, optimizer (with its Q3R operators),
  LR scheduler, technique state (Q3R regulariser, rank controller), RNG states, step; ``resume=True`` continues
  from it and reproduces the uninterrupted run exactly on the CPU (the batch order is a function of
  ``(seed, epoch)`` only, and every random state is restored). The file is written atomically with its SHA-256
  and read back with ``weights_only=True`` after checking it (see :mod:`.checkpoint`);
* ``final.json`` (metrics), ``final_model.pt`` (a dense state dict of the plain architecture, usable as
  ``init_from``), and ``loss.png``, ``ranks.png``, ``spectra.png``.

The adapter techniques (``lora``, ``tenslora``, ``spectral-lora``) fine-tune a pretrained base: on an image task
(``adapter_base``: ``auto`` on digits, or ``pretrain``) a base trained on classes 0-4 is adapted, with a fresh
head, to classes 5-9, and the run is evaluated on the test images of classes 5-9. The base is trained once per
(model shape, data, ``pretrain_steps``) with a fixed seed and cached in ``cache_dir``; its training does not
touch the run's random state, so a cached and a fresh base give the same run.

Under ``torchrun`` (``distributed``: ``ddp``, or ``fsdp2``; ``auto`` picks ``ddp`` when ``WORLD_SIZE > 1``) every
process runs ``run(cfg)``: the process group is initialised from torchrun's environment (gloo on the CPU, nccl on
CUDA, ``cuda:LOCAL_RANK``) and destroyed at the end. Each global batch (the single-process batch of the
``(seed, epoch)`` order) is cut into ``world_size`` contiguous, disjoint parts, one per process, and each process
scales its summed loss by ``world_size / (tokens of the global batch)``, so the averaged gradient is that of the
global batch: DDP reproduces the single-process run up to rounding. The model is wrapped
(``DistributedDataParallel``; or ``fully_shard`` on every target Linear, then on the whole model) before the
optimizer is built (AdamQ3R then holds the ``DTensor`` weights, see ``lowrank_kernels.q3r.sharded``); after a
rank-controller resize the DDP wrapper is rebuilt (``rewrap_ddp``). Rank 0 alone writes ``config.json``,
``log.jsonl``, ``final.json``, ``final_model.pt`` and the plots; the logged loss is that of the global batch.
Checkpoints hold the whole model state plus one optimizer / RNG file per process (see :mod:`.checkpoint`);
``--resume`` under torchrun with the same number of processes continues the run.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._modules import matches_target
from . import report
from .checkpoint import (
    load_checkpoint,
    load_rank_checkpoint,
    prune_rank_checkpoints,
    rank_checkpoint_path,
    restore,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import RUN_CONTROL, TrainConfig, from_dict, load_file, resolve_distributed, to_dict, validate
from .data import Data, epoch_order, make_data, split_classes
from .errors import ConfigError
from .techniques import ADAPTERS, Technique, TechniqueUnavailable, availability

__all__ = ["ConfigError", "TechniqueUnavailable", "TrainConfig", "availability", "from_dict", "load_file", "run"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} requested but CUDA is not available here (use cpu or auto)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device='mps' requested but MPS is not available here (use cpu or auto)")
    return torch.device(name)


def build_model(cfg: TrainConfig, data: Data) -> nn.Module:
    from .models import gpt_tiny, init_like_timm, vit_tiny

    if cfg.model == "vit-tiny":
        model = vit_tiny(dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, num_classes=data.num_classes)
    else:
        model = gpt_tiny(data.num_classes, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, max_len=cfg.seq_len)
    init_like_timm(model)
    return model


# the adapter techniques' pretrained base: AdamW with this lr and batch, 10% warm-up then cosine, seed 0
BASE_LR, BASE_BATCH, BASE_SEED, _BASE_FORMAT = 3e-3, 64, 0, 1


def cache_dir(cfg: TrainConfig) -> Path:
    """``cfg.cache_dir``, else ``$LOWRANK_KERNELS_CACHE``, else ``$XDG_CACHE_HOME`` (or ``~/.cache``) +
    ``/lowrank-kernels``."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    if os.environ.get("LOWRANK_KERNELS_CACHE"):
        return Path(os.environ["LOWRANK_KERNELS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lowrank-kernels"


def adapts_pretrained_base(cfg: TrainConfig) -> bool:
    """Whether this run adapts a base pretrained on classes 0-4 to classes 5-9 (see the module docstring)."""
    if cfg.technique not in ADAPTERS or cfg.init_from or cfg.model != "vit-tiny":
        return False
    return cfg.adapter_base == "pretrain" or (cfg.adapter_base == "auto" and cfg.data == "digits")


def pretrained_base(cfg: TrainConfig, pre: Data, device: torch.device) -> tuple[dict, dict]:
    """``(state_dict, info)`` of the base trained on ``pre`` (classes 0-4), from the cache or trained now.

    Training forks the RNG (the caller's random state is unchanged) and seeds itself with ``BASE_SEED``."""
    key = (f"{cfg.model}-{cfg.data}{'' if cfg.data == 'digits' else f'-seed{cfg.seed}'}-{pre.num_classes}cls-"
           f"dim{cfg.dim}-depth{cfg.depth}-heads{cfg.heads}-steps{cfg.pretrain_steps}-v{_BASE_FORMAT}")
    path = cache_dir(cfg) / f"adapter-base-{key}.pt"
    if path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            return blob["state"], {"path": str(path), "cached": True, "pretrain_acc": float(blob["acc"])}
        except Exception:  # noqa: BLE001 - an unreadable cache entry is trained again and replaced
            pass
    t0 = time.time()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BASE_SEED)
        model = build_model(cfg, pre).to(device)
        x, y = pre.x_train.to(device), pre.y_train.to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=BASE_LR, weight_decay=0.05)
        steps = cfg.pretrain_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(TrainConfig(warmup_frac=0.1), steps))
        spe = math.ceil(len(x) / BASE_BATCH)
        model.train()
        for step in range(steps):
            epoch, i = divmod(step, spe)
            if i == 0:
                order = epoch_order(len(x), BASE_SEED, epoch).to(device)
            idx = order[i * BASE_BATCH:(i + 1) * BASE_BATCH]
            loss = task_loss(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
        acc = evaluate(model, pre.x_test.to(device), pre.y_test.to(device))["acc"]
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save({"state": state, "acc": acc}, tmp)
    os.replace(tmp, path)
    return state, {"path": str(path), "cached": False, "pretrain_acc": acc, "pretrain_s": round(time.time() - t0, 2)}


def _load_trunk(model: nn.Module, state: dict) -> None:
    """The base's weights except its classifier head (the adapted model has a fresh one)."""
    head = ("head.", "lm_head.")
    missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if not k.startswith(head)},
                                                strict=False)
    if unexpected or any(not k.startswith(head) for k in missing):
        raise ConfigError(f"the cached adapter base does not fit this model (missing {missing}, unexpected "
                          f"{unexpected}); delete it or set cache_dir")


def find_targets(model: nn.Module, target_modules: str) -> list[str]:
    pats = [t.strip() for t in target_modules.split(",") if t.strip()]
    names = [n for n, m in model.named_modules()
             if n and isinstance(m, nn.Linear) and matches_target(n, pats)]
    if not names:
        raise ConfigError(f"target_modules={target_modules!r} matches no Linear layer of {type(model).__name__}")
    return names


def check_ranks(cfg: TrainConfig, model: nn.Module, targets: list[str], fused: dict[str, int]) -> None:
    """A rank larger than a layer is a user error, reported before training starts."""
    for name in targets:
        lin = model.get_submodule(name)
        for label, a, b in report.slice_labels(name, lin.out_features, fused):
            m, n = b - a, lin.in_features
            if isinstance(cfg.target_rank, int) and cfg.target_rank > min(m, n) and cfg.technique in (
                    "adamq3r", "q3r", "lorita-q3r"):
                raise ConfigError(f"target_rank={cfg.target_rank} is larger than layer {label} ({m}x{n}): at most "
                                  f"{min(m, n)}")
        if cfg.technique in ("controller", "lora") and cfg.rank > min(lin.out_features, lin.in_features):
            raise ConfigError(f"rank={cfg.rank} is larger than layer {name} ({lin.out_features}x{lin.in_features}):"
                              f" at most {min(lin.out_features, lin.in_features)}")
    if cfg.technique == "controller" and cfg.min_rank > cfg.rank:
        raise ConfigError(f"min_rank={cfg.min_rank} is larger than the initial rank={cfg.rank}")


def task_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.flatten(0, -2), y.flatten())


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> dict[str, float]:
    """Test loss and accuracy (next-token accuracy and perplexity for an LM)."""
    was = model.training
    model.eval()
    loss, correct, count = 0.0, 0, 0
    for i in range(0, len(x), batch):
        out = model(x[i:i + batch])
        t = y[i:i + batch]
        loss += float(F.cross_entropy(out.flatten(0, -2), t.flatten(), reduction="sum"))
        correct += int((out.argmax(-1) == t).sum())
        count += t.numel()
    model.train(was)
    res = {"loss": loss / count, "acc": correct / count}
    if y.dim() > 1:
        res["ppl"] = math.exp(min(res["loss"], 50.0))
    return res


def _lr_lambda(cfg: TrainConfig, total: int):
    warm = int(cfg.warmup_frac * total)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
    return f


def _rank_span(ranks: dict) -> str:
    vals = list(ranks.values())
    return "" if not vals else f"{min(vals)}-{max(vals)}" if min(vals) != max(vals) else str(vals[0])


def _load_init(model: nn.Module, path: str) -> None:
    p = Path(path)
    if p.is_dir():
        p = p / "final_model.pt"
    if not p.is_file():
        raise ConfigError(f"init_from: {str(p)!r} not found (give a finished run's folder or its final_model.pt)")
    state = torch.load(p, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(f"init_from: {str(p)!r} does not fit this model ({str(exc).splitlines()[0]})") from None


def _read_log(path: Path, upto: int | None = None) -> list[dict]:
    if not path.is_file():
        return []
    with open(path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return recs if upto is None else [r for r in recs if r.get("step", 0) <= upto]


class _Log:
    def __init__(self, path: Path, keep_upto: int | None):
        if keep_upto is None:
            path.unlink(missing_ok=True)
        else:  # a resumed run drops what the killed run logged after its checkpoint
            recs = _read_log(path, keep_upto)
            path.write_text("".join(json.dumps(r) + "\n" for r in recs))
        self.f = open(path, "a")

    def write(self, rec: dict) -> None:
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


class _Dist:
    """Where this process stands: ``mode`` (none / ddp / fsdp2), ``rank``, ``world``; ``main`` writes the files."""

    def __init__(self, mode: str):
        import torch.distributed as dist

        self.mode, self.rank, self.world, self.local_rank, self.owns_group = mode, 0, 1, 0, False
        if mode == "none":
            return
        if not dist.is_initialized():
            missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
            if missing:
                raise ConfigError(f"distributed={mode}: launch with torchrun (the environment lacks "
                                  f"{', '.join(missing)})")
            self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            cuda = torch.cuda.is_available()
            if cuda:
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group("nccl" if cuda else "gloo")
            self.owns_group = True
        else:
            self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owns_group = False


class _NoLog:
    def write(self, rec: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _device(cfg: TrainConfig, dd: _Dist) -> torch.device:
    device = resolve_device(cfg.device)
    if dd.world > 1 and device.type == "cuda":
        return torch.device("cuda", dd.local_rank)
    return device


def _shard(model: nn.Module, targets: list[str]) -> None:
    """FSDP2: ``fully_shard`` every target Linear (its weight split by rows), then the whole model."""
    import warnings

    from torch.distributed.fsdp import fully_shard

    # FSDP2 warns that a Linear applied to a (B, T, C) input returns a view (an in-place op on it would skip the
    # backward all-gather); the app's models never modify a Linear's output in place, and the 2-process runs
    # equal the 1-process ones (python_tests/test_app_distributed.py)
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor", category=UserWarning)
    for name in targets:
        fully_shard(model.get_submodule(name))
    fully_shard(model)


class _Shadow:
    """A plain (unsharded) copy of an FSDP2 model on rank 0 for the reports: :meth:`sync` (a collective, every
    process calls it) gathers the whole weights into it."""

    def __init__(self, plain: nn.Module, model: nn.Module, dd: _Dist):
        self.plain, self.model, self.dd = plain, model, dd

    @torch.no_grad()
    def sync(self) -> nn.Module:
        mine = dict(self.plain.named_parameters()) if self.dd.main else {}
        for name, p in self.model.named_parameters():
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            if self.dd.main:
                mine[name].copy_(full)
        return self.plain


def _model_state(model: nn.Module, dd: _Dist) -> dict:
    """The whole model state as one process holds it (a collective under FSDP2; only rank 0's is complete)."""
    if dd.mode == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict()


def run(cfg: TrainConfig) -> dict:
    """Train ``cfg``; returns the final metrics (``{"stopped_at": step}`` when ``stop_after`` ends it early).

    Under torchrun every process calls it and gets the same result (see the module docstring)."""
    validate(cfg)
    dd = _Dist(resolve_distributed(cfg.distributed))
    try:
        return _run(cfg, dd)
    finally:
        dd.close()


def _run(cfg: TrainConfig, dd: _Dist) -> dict:
    out = Path(cfg.out)
    ckpt_path, final_path = out / "checkpoint.pt", out / "final.json"
    ckpt = rank_ckpt = None
    if cfg.resume:
        if not ckpt_path.is_file():
            raise ConfigError(f"--resume: no checkpoint at {str(ckpt_path)!r}")
        ckpt = load_checkpoint(ckpt_path)  # digest, keys and weights_only checked (see checkpoint.py)
        saved = ckpt["config"]
        diff = [k for k, v in to_dict(cfg).items() if k not in RUN_CONTROL and saved.get(k) != v]
        if diff:
            raise ConfigError(f"--resume: config differs from the checkpoint's in {', '.join(diff)}")
        if (ckpt.get("distributed", "none"), ckpt.get("world_size", 1)) != (dd.mode, dd.world):
            raise ConfigError(f"--resume: the checkpoint was saved with distributed={ckpt.get('distributed', 'none')} "
                              f"by {ckpt.get('world_size', 1)} process(es), this launch is distributed={dd.mode} with "
                              f"{dd.world} (the batch split and the optimizer state depend on both)")
        if dd.world > 1:
            rank_ckpt = load_rank_checkpoint(ckpt_path, ckpt["step"], dd.rank, dd.world)
    device = _device(cfg, dd)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    task = "classify" if cfg.model == "vit-tiny" else "lm"
    data = make_data(cfg.data, task, cfg.seed, cfg.seq_len, cfg.tokenizer)
    base_info = None
    if adapts_pretrained_base(cfg):
        half = data.num_classes // 2
        pre, data = split_classes(data, 0, half), split_classes(data, half, data.num_classes)
    model = build_model(cfg, data)
    if cfg.init_from:
        _load_init(model, cfg.init_from)
    elif adapts_pretrained_base(cfg):
        base_state, base_info = pretrained_base(cfg, pre, device)
        _load_trunk(model, base_state)
        base_info = {"pretrained_on": pre.description, "adapted_to": data.description, **base_info}
    targets = find_targets(model, cfg.target_modules)
    fused = {"qkv": 3} if cfg.fuse_qkv else {}
    check_ranks(cfg, model, targets, fused)
    model.to(device)
    xtr, ytr, xte, yte = (t.to(device) for t in (data.x_train, data.y_train, data.x_test, data.y_test))
    spe = math.ceil(len(xtr) / cfg.batch_size)
    total = cfg.steps or cfg.epochs * spe
    spectra_before = report.spectra(model, targets, fused)
    shadow = None
    if dd.mode == "fsdp2":  # the plain model takes the saved weights, then is sharded; the optimizer comes after
        import copy

        if ckpt is not None:
            restore(ckpt_path, [("model", lambda: model.load_state_dict(ckpt["model"]))])
        shadow = _Shadow(copy.deepcopy(model) if dd.main else None, model, dd)
        _shard(model, targets)
    try:
        tech = Technique(cfg, model, targets, fused, total)
    except ConfigError:  # already phrased for the user (unknown or unavailable technique)
        raise
    except ValueError as exc:  # the library's own argument checks (ranks, slices...) are user errors here
        raise ConfigError(f"technique {cfg.technique!r}: {exc}") from None
    opt = tech.optimizer
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, total))
    step, elapsed = 0, 0.0
    if ckpt is not None:
        parts = [("technique", lambda: tech.load_state_dict(ckpt["technique"]))]
        if dd.mode != "fsdp2":
            parts.append(("model", lambda: model.load_state_dict(ckpt["model"])))
        own = rank_ckpt if rank_ckpt is not None else ckpt
        parts += [("optimizer", lambda: opt.load_state_dict(own["optimizer"])),
                  ("scheduler", lambda: sched.load_state_dict(ckpt["scheduler"])),
                  ("rng", lambda: set_rng_state(own["rng"]))]
        restore(ckpt_path, parts)
        step, elapsed, spectra_before = ckpt["step"], ckpt["elapsed"], ckpt["spectra_before"]
    elif dd.main:
        final_path.unlink(missing_ok=True)
    net = model  # what the loop calls: the model, or its DDP wrapper
    if dd.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    def view() -> nn.Module:  # the plain model for reports (a collective under FSDP2)
        return shadow.sync() if shadow is not None else model

    if dd.main:
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
        log = _Log(out / "log.jsonl", step if ckpt is not None else None)
    else:
        log = _NoLog()
    if ckpt is None and cfg.rank_every:
        plain = view()
        if dd.main:
            log.write({"step": 0, **_rank_record(tech, plain, targets, fused)})

    def save_ckpt():
        model_sd, opt_sd = _model_state(model, dd), opt.state_dict()  # collectives under FSDP2 / Q3R sharded
        if dd.world > 1:  # every process's own optimizer and RNG state, then rank 0's main file
            save_checkpoint({"rank": dd.rank, "world_size": dd.world, "step": step, "optimizer": opt_sd,
                             "rng": rng_state()}, rank_checkpoint_path(ckpt_path, step, dd.rank))
            dd.barrier()
            opt_sd = None
        if dd.main:
            save_checkpoint({"config": to_dict(cfg), "step": step, "elapsed": elapsed + time.time() - t_loop,
                             "model": model_sd, "optimizer": opt_sd, "scheduler": sched.state_dict(),
                             "technique": tech.state_dict(), "rng": rng_state(), "spectra_before": spectra_before,
                             "distributed": dd.mode, "world_size": dd.world}, ckpt_path)
            if dd.world > 1:
                prune_rank_checkpoints(ckpt_path, step)
        dd.barrier()

    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=step, disable=not cfg.progress or not dd.main, desc=cfg.technique,
               dynamic_ncols=True, leave=False)
    t_loop = time.time()
    model.train()
    order, order_epoch, ranks = None, -1, {}
    try:
        while step < total:
            epoch, i = divmod(step, spe)
            if epoch != order_epoch:
                order, order_epoch = epoch_order(len(xtr), cfg.seed, epoch).to(device), epoch
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            if dd.world == 1:
                loss = task_loss(net(xtr[idx]), ytr[idx])
                fit = loss
            else:  # this process's part of the global batch; the gradient average is the global batch's
                tokens = len(idx) * ytr[0].numel()
                mine = idx.tensor_split(dd.world)[dd.rank]
                part = F.cross_entropy(net(xtr[mine]).flatten(0, -2), ytr[mine].flatten(), reduction="sum")
                fit = part * (dd.world / tokens)
                loss = part.detach().clone()
                import torch.distributed as dist

                dist.all_reduce(loss)
                loss = loss / tokens
            extra = tech.extra_loss()
            total_loss = fit if extra is None else fit + extra
            seen = loss if extra is None else loss + extra  # under torchrun: the global batch's, the same everywhere
            if not torch.isfinite(seen):
                raise RuntimeError(f"loss became {float(seen)} at step {step} (try a smaller lr / lmbda)")
            opt.zero_grad(set_to_none=True)
            total_loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
            opt.step()
            sched.step()
            events = tech.after_step()
            if events and dd.mode == "ddp":  # the reducer caches the parameter shapes a resize changed
                from ..rank import rewrap_ddp

                net = rewrap_ddp(net)
            step += 1
            rec = {"step": step, "epoch": epoch, "loss": round(loss.item(), 6), "lr": opt.param_groups[0]["lr"]}
            if tech.reg_value() is not None:
                rec["reg"] = tech.reg_value()
            if events:
                rec["events"] = events
            if cfg.rank_every and (step % cfg.rank_every == 0 or step == total or events):
                plain = view()
                if dd.main:
                    rec.update(_rank_record(tech, plain, targets, fused))
                    ranks = rec.get("factor_ranks", rec["ranks"])
            log.write(rec)
            if step % spe == 0 or step == total:
                ev = evaluate(model, xte, yte)  # every process (FSDP2's forward is a collective)
                log.write({"step": step, "eval": ev})
            bar.update(1)
            if step % 10 == 0 or step == total:
                bar.set_postfix(loss=f"{loss.item():.3f}", ranks=_rank_span(ranks))
            if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == total:
                save_ckpt()
            if cfg.stop_after and step >= cfg.stop_after and step < total:
                save_ckpt()
                return {"stopped_at": step}
    finally:
        bar.close()
        log.close()
    train_time = elapsed + time.time() - t_loop
    plain = view()
    final = None
    if dd.main:
        final = _finish(cfg, tech, plain, targets, fused, xte, yte, spectra_before, out, train_time, total, base_info,
                        inf=plain if shadow is not None else None)
    if dd.world > 1:
        from ..distributed import broadcast_object

        final = broadcast_object(final, 0)
    return final


def _rank_record(tech, model, targets, fused) -> dict:
    """``ranks``: rank@1% of every target layer / slice; with the controller also ``factor_ranks``: the rank
    ``r`` of each ``LowRankLinear`` (its factors' width, which the controller sets)."""
    rec = {"ranks": report.effective_ranks(model, targets, fused)}
    if tech.controller is not None:
        rec["factor_ranks"] = dict(tech.controller.ranks)
    return rec


def _finish(cfg, tech, model, targets, fused, xte, yte, spectra_before, out: Path, train_time: float,
            total: int, base_info: dict | None = None, inf: nn.Module | None = None) -> dict:
    """Final metrics, ``final_model.pt``, plots and ``final.json``; ``inf``: the model as deployed (default:
    ``tech.inference_model()``; under FSDP2 the gathered plain copy)."""
    from .models import count_parameters

    inf = tech.inference_model() if inf is None else inf
    res = evaluate(inf, xte, yte)
    sp_after = report.spectra(inf, targets, fused)
    ranks_t = report.target_ranks(inf, targets, fused, cfg.target_rank)
    trunc, factored = report.truncated_copy(inf, targets, fused, ranks_t)
    dense, _ = report.truncated_copy(inf, targets, fused, None)
    final = {
        "technique": cfg.technique, "model": cfg.model, "data": cfg.data, "seed": cfg.seed, "steps": total,
        "test_loss": res["loss"], "test_acc": res["acc"], **({"test_ppl": res["ppl"]} if "ppl" in res else {}),
        "params": count_parameters(inf, trainable_only=False),
        "params_trainable": count_parameters(model, trainable_only=True),
        "params_trainable_frac": round(count_parameters(model, trainable_only=True)
                                       / max(1, count_parameters(model, trainable_only=False)), 5),
        "target_ranks": ranks_t, "truncated_params": factored,
        "truncated_acc": evaluate(trunc, xte, yte)["acc"],
        "layers": {k: report.rank_stats(v) for k, v in sp_after.items()},
        "train_time_s": round(train_time, 2),
    }
    if tech.controller is not None:
        final["controller_ranks"] = tech.controller.ranks
    if base_info is not None:
        final["adapter_base"] = base_info
    torch.save(dense.state_dict(), out / "final_model.pt")
    if cfg.plots:
        final["plots"] = report.write_plots(out, _read_log(out / "log.jsonl"), spectra_before, sp_after,
                                            f"{cfg.model} / {cfg.data} / {cfg.technique}", cfg.technique)
    (out / "final.json").write_text(json.dumps(final, indent=1))
    return final
