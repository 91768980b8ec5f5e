"""``python -m bench.gpu_targets [--quick | --full] [--device D] [--out DIR] [--budget S]``: issue 15's GPU targets.

Runs the parts of the bench suite the targets need, merges their rows into ``<out>/<device-slug>.csv``
(``<out>/quick/`` for quick runs, as every bench run) and prints one ``TARGET`` line per target with its
measured ratio, then writes the same lines as ``<out>/gpu-targets.csv`` (``name, measured, target, met``).
The targets, at the full shapes on one H100/H200 (``.ci/gpu`` runs this):

* ``q3r``: an AdamQ3R step (the default route of the device: ``triton`` on CUDA, ``torch`` on a CPU) at most
  1.15x ``torch.optim.AdamW`` (its default for the device, foreach on CUDA), per step amortised over one
  rebuild period (``bench_q3r``, ViT-Tiny parameter set);
* ``lora full``: LoRA forward+backward at least 1.3x faster than PEFT's layer (PEFT time / ours), and
  ``lora forward``: the forward at most 1.1x the dense ``x @ W.T + bias`` (``bench_lora_matmul``, bf16,
  M=8192, in=out=4096, r in {16, 64}), for the default ``composed`` path; the ``triton`` kernel's ratios are
  printed as information;
* ``controller``: one ``RankController`` decision at least 3x faster than the per-layer reference
  (``bench_rank_controller``'s ``upstream`` / ``ours`` with no layer resized).

Quick mode runs the same code at the scripts' quick shapes (seconds on a CPU; the ratios then mean
nothing, the run proves the command works). The exit status is 1 when a script failed, or with
``--strict`` when a measured target was missed; a target whose rows are missing prints ``not measured``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import importlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.common import DEFAULT_OUT, add_run_args, resolve_device, results_path

LORA_RANKS = (16, 64)
LORA_PROVIDERS = ("dense", "composed", "triton", "peft")
# the quickest first, so a spent --budget costs the fewest targets
SCRIPTS = ("bench_rank_controller", "bench_q3r", "bench_lora_matmul")


@dataclass
class Target:
    """One line of the report: ``measured`` (a ratio, None when not measured) against ``bound``."""

    name: str
    measured: float | None
    bound: float
    at_most: bool  # True: measured <= bound is met; False: measured >= bound
    info: bool = False  # printed for information, never a miss

    @property
    def met(self) -> bool | None:
        if self.measured is None:
            return None
        return self.measured <= self.bound if self.at_most else self.measured >= self.bound

    def line(self) -> str:
        op = "<=" if self.at_most else ">="
        if self.measured is None:
            verdict, value = "not measured", "–"
        else:
            verdict, value = ("info" if self.info else "met" if self.met else "MISSED"), f"{self.measured:.3f}x"
        return f"TARGET {self.name}: {value} (target {op} {self.bound:g}x) {verdict}"


def _times(rows: Sequence[dict], kernel: str) -> dict[tuple, float]:
    """``{(provider, mode, x_value, config): p50}`` of a kernel's ``time`` rows."""
    out = {}
    for r in rows:
        if r["kernel"] == kernel and r["metric"] == "time" and r["p50"] not in ("", None):
            out[(r["provider"], r["mode"], str(r["x_value"]), r["config"])] = float(r["p50"])
    return out


def _ratio(t: dict, num: tuple, den: tuple) -> float | None:
    return t[num] / t[den] if num in t and den in t and t[den] > 0 else None


def evaluate(rows: Sequence[dict], device_type: str = "cuda") -> list[Target]:
    """The targets from bench rows (stamped or not)."""
    targets: list[Target] = []
    q3r = _times(rows, "q3r")
    default_route = "triton" if device_type == "cuda" else "torch"
    steps = {(p, x, c) for p, m, x, c in q3r if m == "step"}
    for provider in ("triton", "torch"):
        found = sorted((x, c) for p, x, c in steps if p == provider)
        if not found and provider != default_route:
            continue  # e.g. no triton provider on a CPU
        for x, c in found or [("?", "")]:
            targets.append(Target(f"q3r AdamQ3R({provider}) / AdamW step, blocks={x}",
                                  _ratio(q3r, (provider, "step", x, c), ("adamw", "step", x, c)), 1.15, True,
                                  info=provider != default_route))
    lora = _times(rows, "lora_matmul")
    keys = sorted({(x, c) for _, _, x, c in lora}, key=lambda k: (float(k[0]), k[1])) or [("?", "")]
    for x, c in keys:
        for ours in ("composed", "triton"):
            info = ours != "composed"
            targets.append(Target(f"lora full PEFT / {ours}, r={x}", _ratio(lora, ("peft", "full", x, c),
                                                                             (ours, "full", x, c)), 1.3, False, info))
            targets.append(Target(f"lora forward {ours} / dense, r={x}", _ratio(lora, (ours, "forward", x, c),
                                                                                 ("dense", "forward", x, c)), 1.1,
                                  True, info))
    ctrl = _times(rows, "rank_controller")
    xs = sorted({c for p, m, x, c in ctrl if m == "step" and x == "0"}) or [""]
    for c in xs:
        targets.append(Target("controller decision upstream / ours, 0 layers resized",
                              _ratio(ctrl, ("upstream", "step", "0", c), ("ours", "step", "0", c)), 3.0, False))
    return targets


def _script(name: str, quick: bool):
    run = importlib.import_module(f"bench.{name}").run
    if name == "bench_lora_matmul":
        run = functools.partial(run, ranks=None if quick else LORA_RANKS, providers=LORA_PROVIDERS)
    return run


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_targets", description=__doc__.split("\n\n")[0])
    add_run_args(parser)
    parser.add_argument("--timeout", type=float, default=None, help="seconds allowed per script (best effort)")
    parser.add_argument("--budget", type=float, default=None, help="seconds for all scripts together")
    parser.add_argument("--scripts", nargs="+", default=list(SCRIPTS), choices=SCRIPTS,
                        help="measure only these (the other targets print 'not measured')")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a measured target is missed")
    args = parser.parse_args(argv)
    from bench import __main__ as runner

    device = resolve_device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    out = Path(args.out) if args.out else DEFAULT_OUT
    results = runner.run_scripts([(n, _script(n, args.quick)) for n in args.scripts], args.quick, device, out,
                                 args.timeout, budget=args.budget)
    print(runner.summary(results))
    rows = [row for r in results for row in r.rows]
    targets = evaluate(rows, device.type)
    print(f"\nGPU targets ({'quick shapes: the ratios mean nothing' if args.quick else 'full shapes'}, {device}):")
    for t in targets:
        print(t.line())
    folder = results_path(out, device, quick=args.quick).parent
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "gpu-targets.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["name", "measured", "target", "met"])
        for t in targets:
            writer.writerow([t.name, "" if t.measured is None else f"{t.measured:.6g}",
                             f"{'<=' if t.at_most else '>='} {t.bound:g}", "info" if t.info else t.met])
    print(f"results: {results_path(out, device, quick=args.quick)}, targets: {folder / 'gpu-targets.csv'}")
    failed = any(r.error for r in results)
    missed = any(t.met is False and not t.info for t in targets)
    return 1 if failed or (args.strict and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
