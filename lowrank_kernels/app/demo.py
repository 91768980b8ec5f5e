"""``lowrank-kernels demo``: TinyViT on sklearn digits, three ways, one table.

1. dense AdamW;
2. AdamQ3R (Q3R rank regulariser, target rank ``TARGET_RANK`` per layer / per Q, K, V slice);
3. ``LowRankLinear`` layers with a ``RankController`` adapting their ranks during training.

For each: test accuracy, parameter count, effective rank per layer (number of singular values above 1% of
the largest; stable rank beside it), and the test accuracy after truncating every target layer to
``TARGET_RANK`` by SVD (with the parameter count of that truncated model stored as factors).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..testing import device_name, git_commit, slugify
from .config import from_dict

TARGET_RANK = 4  # of 64: small enough that a dense model loses most of its accuracy when truncated
COMMON = dict(model="vit-tiny", data="digits", batch_size=64, lr=3e-3, weight_decay=0.05, target_rank=TARGET_RANK,
              rank_every=20)
# lmbda: the decoupled Q3R step is lr * 2 lmbda L X R; 8 balanced accuracy and rank in a scan of 1, 2, 5, 8, 20
RUNS = {
    "dense AdamW": dict(technique="adamw"),
    "AdamQ3R": dict(technique="adamq3r", lmbda=8.0, q3r_steps=5),
    "LowRank + controller": dict(technique="controller", rank=16, min_rank=4, interval=40, safety_factor=1.5),
}


def demo_configs(out: str, epochs: int, seed: int, threads: int, progress: bool, plots: bool,
                 lmbda: float | None = None) -> dict:
    cfgs = {}
    for label, spec in RUNS.items():
        d = dict(COMMON, **spec, epochs=epochs, seed=seed, threads=threads, progress=progress, plots=plots,
                 out=f"{out}/{spec['technique']}")
        if lmbda is not None and spec["technique"] == "adamq3r":
            d["lmbda"] = lmbda
        cfgs[label] = from_dict(d)
    return cfgs


def _fmt_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths, strict=True)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def format_results(results: dict, epochs: int, threads: int, wall: float) -> str:
    first = next(iter(results.values()))
    layers = list(first["layers"])
    lines = [f"TinyViT (dim 64, depth 2, 4 heads) on sklearn digits (1347 train / 450 test 8x8 images), "
             f"{epochs} epochs, batch 64, {threads} CPU thread(s). Wall time {wall:.0f} s.",
             f"eff. rank = #singular values > 1% of the largest (per layer; qkv per Q/K/V slice); stable rank = "
             f"||W||_F^2 / sigma_max^2. Truncation: best rank-{TARGET_RANK} approximation of every layer / slice.", ""]
    rows = []
    for label, r in results.items():
        ranks = [v["rank"] for v in r["layers"].values()]
        srs = [v["stable_rank"] for v in r["layers"].values()]
        rows.append([label, f"{r['test_acc']:.3f}", f"{r['params']:,}", f"{min(ranks)}-{max(ranks)}",
                     f"{sum(srs) / len(srs):.2f}", f"{r['truncated_acc']:.3f}", f"{r['truncated_params']:,}",
                     f"{r['train_time_s']:.0f} s"])
    lines.append(_fmt_table(rows, ["technique", "test acc", "params", "eff. rank", "mean stable rank",
                                   f"acc @ rank {TARGET_RANK}", f"params @ rank {TARGET_RANK}", "train time"]))
    lines.append("")
    rows = []
    for layer in layers:
        row = [layer]
        for r in results.values():
            st = r["layers"][layer]
            row.append(f"{st['rank']} / {st['stable_rank']:.1f}")
        rows.append(row)
    lines.append(_fmt_table(rows, ["eff. rank / stable rank per layer", *results]))
    ctl = next((r for r in results.values() if "controller_ranks" in r), None)
    if ctl:
        lines.append("")
        lines.append("controller's final factor ranks: " + ", ".join(f"{k}={v}" for k, v in
                                                                     ctl["controller_ranks"].items()))
    return "\n".join(lines)


def machine_slug() -> str:
    """File-name form of the machine's name (``cpu-amd-epyc``), as the benchmark result files use."""
    return slugify(device_name())


def default_results_path() -> str:
    """``bench/results/demo-<machine>.json``: where the committed demo results live (relative to the repo root)."""
    return f"bench/results/demo-{machine_slug()}.json"


def results_record(results: dict, epochs: int, seed: int, threads: int, wall: float) -> dict:
    """The demo's results file: the run's settings and one row per technique (what the README table shows).

    ``rows[i]``: ``label``, ``technique``, ``test_acc``, ``params``, ``eff_rank_min`` / ``eff_rank_max`` (rank@1%
    over the layers / slices), ``mean_stable_rank``, ``truncated_acc`` / ``truncated_params`` (every layer at
    rank ``target_rank``), ``train_time_s``, ``layers`` (``{label: {rank, stable_rank}}``) and, for the
    controller, ``controller_ranks``."""
    import torch

    rows = []
    for label, r in results.items():
        ranks = [v["rank"] for v in r["layers"].values()]
        srs = [v["stable_rank"] for v in r["layers"].values()]
        row = {"label": label, "technique": r["technique"], "test_acc": r["test_acc"], "params": r["params"],
               "eff_rank_min": min(ranks), "eff_rank_max": max(ranks),
               "mean_stable_rank": round(sum(srs) / len(srs), 3), "truncated_acc": r["truncated_acc"],
               "truncated_params": r["truncated_params"], "train_time_s": r["train_time_s"], "layers": r["layers"]}
        if "controller_ranks" in r:
            row["controller_ranks"] = r["controller_ranks"]
        rows.append(row)
    return {"kind": "demo", "model": "vit-tiny (dim 64, depth 2, 4 heads)", "data": "sklearn digits",
            "epochs": epochs, "batch_size": COMMON["batch_size"], "seed": seed, "threads": threads,
            "target_rank": TARGET_RANK, "machine": device_name(), "torch": torch.__version__, "commit": git_commit(),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "wall_s": round(wall, 1),
            "rows": rows}


def run_demo(out: str = "runs/demo", epochs: int | None = None, seed: int = 0, threads: int = 1,
             progress: bool = True, quick: bool = False, lmbda: float | None = None, plots: bool = True,
             only: list[str] | None = None, echo: bool = True, results_path: str | None = None) -> dict:
    """Run the three trainings, print and return ``{label: final metrics}`` (also ``OUT/demo.json``, ``.txt``).

    ``results_path``: also write :func:`results_record` there (the committed file the README's table is
    generated from: :func:`default_results_path`)."""
    from .train import run

    epochs = epochs or (8 if quick else 20)
    t0 = time.time()
    cfgs = demo_configs(out, epochs, seed, threads, progress, plots, lmbda)
    results = {}
    for label, cfg in cfgs.items():
        if only is not None and cfg.technique not in only:
            continue
        if echo:
            print(f"[{label}] training ({cfg.technique}) ...", flush=True)
        results[label] = run(cfg)
    wall = time.time() - t0
    text = format_results(results, epochs, threads, wall)
    Path(out).mkdir(parents=True, exist_ok=True)
    written = [Path(out) / "demo.json", Path(out) / "demo.txt"]
    written[0].write_text(json.dumps(results, indent=1))
    written[1].write_text(text + "\n")
    if results_path:
        Path(results_path).parent.mkdir(parents=True, exist_ok=True)
        Path(results_path).write_text(json.dumps(results_record(results, epochs, seed, threads, wall), indent=1)
                                      + "\n")
        written.append(Path(results_path))
    if echo:
        print()
        print(text)
        print(f"\nwrote {', '.join(map(str, written))}; per-run logs, checkpoints{' and plots' if plots else ''} in "
              f"{', '.join(f'{out}/{c.technique}/' for lab, c in cfgs.items() if lab in results)}")
    return results
