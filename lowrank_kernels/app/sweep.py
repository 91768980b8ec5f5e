"""``lowrank-kernels sweep grid.yaml``: a grid of ``train`` runs as a queue over the available devices.

Grid file (YAML or JSON)::

    out: runs/sweep          # the sweep folder: one sub-folder per run, summary.csv
    workers: 2               # CPU worker processes (with GPUs: one job per GPU instead)
    base: {epochs: 5}        # TrainConfig keys shared by every run
    grid:                    # the cartesian product of these lists
      technique: [adamw, adamq3r]
      seed: [0, 1]
    runs: [{technique: controller, rank: 16}]   # optional extra runs (merged over base)

A run whose folder holds a ``final.json`` for the same config is skipped on restart; one with only a
checkpoint of the same config is resumed. ``workers: 0`` runs the jobs one by one in this process.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from .config import RUN_CONTROL, from_dict, load_file, to_dict
from .errors import ConfigError

SUMMARY_KEYS = ("test_acc", "test_loss", "test_ppl", "truncated_acc", "params", "truncated_params", "train_time_s")


def _slug(d: dict) -> str:
    s = ",".join(f"{k}={v}" for k, v in d.items()) or "base"
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", s)[:150]


def expand(spec: dict, out: str) -> list[tuple[str, dict, object]]:
    """``[(name, varying keys, TrainConfig), ...]``; every config is validated before anything runs."""
    unknown = set(spec) - {"out", "workers", "base", "grid", "runs"}
    if unknown:
        raise ConfigError(f"unknown grid keys {sorted(unknown)} (allowed: out, workers, base, grid, runs)")
    base, grid, extra = spec.get("base") or {}, spec.get("grid") or {}, spec.get("runs") or []
    if not isinstance(base, dict) or not isinstance(grid, dict) or not isinstance(extra, list):
        raise ConfigError("grid file: 'base' and 'grid' must be mappings, 'runs' a list of mappings")
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise ConfigError(f"grid key {k!r} must be a non-empty list, got {v!r}")
    combos = [dict(zip(grid, vals, strict=True)) for vals in itertools.product(*grid.values())] if grid else []
    combos += [dict(r) for r in extra]
    if not combos:
        combos = [{}]
    jobs, seen = [], set()
    for combo in combos:
        name = _slug(combo)
        if name in seen:
            continue
        seen.add(name)
        try:
            cfg = from_dict({**base, **combo, "out": f"{out}/{name}", "progress": False, "resume": False})
        except ConfigError as exc:
            raise ConfigError(f"run {name}: {exc}") from None
        jobs.append((name, combo, cfg))
    return jobs


def _same_config(path: Path, cfg) -> bool:
    if not path.is_file():
        return False
    saved = json.loads(path.read_text())
    return all(saved.get(k) == v for k, v in to_dict(cfg).items() if k not in RUN_CONTROL)


def status(cfg) -> str:
    """``done`` (final.json of this config), ``partial`` (a checkpoint of it) or ``todo``."""
    out = Path(cfg.out)
    if (out / "final.json").is_file() and _same_config(out / "config.json", cfg):
        return "done"
    if (out / "checkpoint.pt").is_file() and _same_config(out / "config.json", cfg):
        return "partial"
    return "todo"


def _run_job(cfg, resume: bool, env: dict | None) -> tuple[bool, str]:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    d = {**to_dict(cfg), "resume": resume}
    if env is None:  # in this process
        from .train import run

        try:
            run(from_dict(d))
            return True, ""
        except Exception as exc:  # noqa: BLE001 - one failed run must not stop the sweep
            return False, f"{type(exc).__name__}: {exc}"
    job = out / "job.json"
    job.write_text(json.dumps(d, indent=1))
    with open(out / "stdout.txt", "w") as f:
        rc = subprocess.call([sys.executable, "-m", "lowrank_kernels.app", "train", "--config", str(job)],
                             stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc == 0:
        return True, ""
    tail = (out / "stdout.txt").read_text().strip().splitlines()
    return False, tail[-1] if tail else f"exit status {rc}"


def _worker_envs(workers: int, device: str) -> list[tuple[dict | None, str]]:
    """One ``(environment, device)`` per worker: a GPU each, or CPU workers sharing the cores."""
    import torch

    if workers == 0:
        return [(None, device)]
    ngpu = torch.cuda.device_count() if device in ("auto", "cuda") else 0
    if ngpu:
        return [({**os.environ, "CUDA_VISIBLE_DEVICES": str(i)}, "cuda") for i in range(ngpu)]
    threads = max(1, (os.cpu_count() or 1) // workers)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": ""}
    return [(env, "cpu")] * workers


def run_sweep(grid_path: str, workers: int | None = None, out: str | None = None, echo: bool = True) -> int:
    """Run the grid; returns 0 when every run finished, 1 otherwise. Writes ``OUT/summary.csv``."""
    import dataclasses

    spec = load_file(grid_path)
    out = out or spec.get("out") or "runs/sweep"
    workers = spec.get("workers", 1) if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"workers must be an int >= 0, got {workers!r}")
    jobs = expand(spec, out)
    todo = queue.Queue()
    states = {}
    for name, _, cfg in jobs:
        states[name] = status(cfg)
        if states[name] != "done":
            todo.put((name, cfg))
    if echo:
        skipped = sum(s == "done" for s in states.values())
        print(f"sweep: {len(jobs)} runs, {skipped} already finished, {todo.qsize()} to run, in {out}/", flush=True)
    errors: dict[str, str] = {}
    lock = threading.Lock()
    n_todo, finished, t0 = todo.qsize(), [0], time.time()

    def worker(env, device):
        while True:
            try:
                name, cfg = todo.get_nowait()
            except queue.Empty:
                return
            if cfg.device == "auto" or env is not None:
                cfg = dataclasses.replace(cfg, device=device)
            if env is not None and device == "cpu" and not cfg.threads:
                cfg = dataclasses.replace(cfg, threads=int(env["OMP_NUM_THREADS"]))
            t_job = time.time()
            ok, msg = _run_job(cfg, states[name] == "partial", env)
            with lock:
                finished[0] += 1
                if not ok:
                    errors[name] = msg
                if echo:
                    print(f"  [{finished[0]}/{n_todo}] {name}: {_result(cfg) if ok else 'FAILED -- ' + msg} "
                          f"({time.time() - t_job:.1f} s, elapsed {time.time() - t0:.1f} s)", flush=True)

    threads = [threading.Thread(target=worker, args=we, daemon=True) for we in _worker_envs(workers, jobs[0][2].device)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = summarize(jobs, errors, out)
    if echo:
        print_summary(rows)
        print(f"summary: {out}/summary.csv")
    return 1 if errors else 0


def _result(cfg) -> str:
    """One finished run's headline numbers, from its final.json."""
    try:
        res = json.loads((Path(cfg.out) / "final.json").read_text())
    except (OSError, ValueError):
        return "done (no final.json)"
    parts = [f"test acc {res['test_acc']:.4f}"]
    if "test_ppl" in res:
        parts.append(f"ppl {res['test_ppl']:.2f}")
    parts.append(f"acc @ target rank {res['truncated_acc']:.4f}")
    return ", ".join(parts)


def summarize(jobs, errors: dict, out: str) -> list[dict]:
    keys = list(dict.fromkeys(k for _, combo, _ in jobs for k in combo))
    rows = []
    for name, combo, cfg in jobs:
        row = {"run": name, **{k: combo.get(k, getattr(cfg, k, "")) for k in keys}}
        final = Path(cfg.out) / "final.json"
        if name in errors or not final.is_file():
            row["status"] = "failed" if name in errors else "missing"
        else:
            res = json.loads(final.read_text())
            row["status"] = "done"
            row.update({k: res.get(k, "") for k in SUMMARY_KEYS})
            ranks = [v["rank"] for v in res["layers"].values()]
            row["mean_rank"] = round(sum(ranks) / len(ranks), 2) if ranks else ""
        rows.append(row)
    cols = [c for c in dict.fromkeys(k for r in rows for k in r) if any(r.get(c, "") != "" for r in rows)]
    rows = [{c: r.get(c, "") for c in cols} for r in rows]
    Path(out).mkdir(parents=True, exist_ok=True)
    with open(Path(out) / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return rows


def print_summary(rows: list[dict]) -> None:
    cols = [c for c in dict.fromkeys(k for r in rows for k in r) if c != "run"]

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    table = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    for t in table:
        print("  ".join(v.rjust(w) for v, w in zip(t, widths, strict=True)))
