"""``python -m bench [NAMES...] [--quick | --full] [--device D] [--out DIR]``: run the benchmark scripts.

Runs every ``bench/bench_*.py`` (or the ones named: ``lowrank_matmul``, ``bench_lowrank_matmul`` or
``bench/bench_lowrank_matmul.py``) in this process, one after the other, stamps their rows with the
device, versions, commit and time, and merges them into ``<out>/<device-slug>.csv`` (quick runs:
``<out>/quick/<device-slug>.csv``) after each script, so a run cut short keeps what finished. A script
that raises is reported and makes the exit status 1; the others still run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import inspect
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.common import (
    DEFAULT_OUT,
    add_run_args,
    append_rows,
    env_info,
    format_table,
    resolve_device,
    results_path,
    stamp_rows,
)

BENCH_DIR = Path(__file__).resolve().parent


@dataclass
class ScriptResult:
    name: str
    seconds: float
    rows: list[dict] = field(default_factory=list)
    error: str | None = None


def discover(names: Sequence[str] = ()) -> list[str]:
    """Module names (``bench_<stem>``) of the scripts to run; raises ``ValueError`` for an unknown name."""
    available = sorted(p.stem for p in BENCH_DIR.glob("bench_*.py"))
    if not names:
        return available
    chosen = []
    for name in names:
        stem = Path(name).stem
        stem = stem if stem.startswith("bench_") else f"bench_{stem}"
        if stem not in available:
            raise ValueError(f"no benchmark script {name!r}; available: {', '.join(available) or 'none'}")
        chosen.append(stem)
    return chosen


class ScriptTimeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float | None):
    """Best effort: interrupts Python code of the script after ``seconds`` (main thread, POSIX only)."""
    if not seconds or not hasattr(signal, "SIGALRM"):
        yield
        return

    def _raise(signum, frame):
        raise ScriptTimeout(f"exceeded --timeout {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _check_rows(rows) -> list[dict]:
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise TypeError(f"run() must return a list of dicts from make_row, got {type(rows).__name__}")
    if not rows:
        raise ValueError("run() returned no rows")
    return rows


def run_one(name: str, run: Callable[..., list[dict]], quick: bool, device: torch.device, out: str | os.PathLike,
            timeout: float | None = None) -> ScriptResult:
    """Run one script's ``run`` and merge its rows into the results file; exceptions become ``error``."""
    saved_env = dict(os.environ)
    start = time.perf_counter()
    streamed: list[dict] = []  # rows a script hands over early (``on_rows``) survive its failure or timeout
    kwargs = {"quick": quick, "device": str(device)}
    if _accepts_on_rows(run):
        kwargs["on_rows"] = streamed.extend
    try:
        with _time_limit(timeout):
            rows = stamp_rows(_check_rows(run(**kwargs)), env_info(device))
        append_rows(results_path(out, device, quick=quick), rows)
        return ScriptResult(name, time.perf_counter() - start, rows)
    except (Exception, ScriptTimeout):
        error = traceback.format_exc()
        kept = stamp_rows(streamed, env_info(device)) if streamed else []
        if kept:
            append_rows(results_path(out, device, quick=quick), kept)
            error += f"({len(kept)} rows measured before the failure were kept)\n"
        return ScriptResult(name, time.perf_counter() - start, kept, error=error)
    finally:
        # A script may switch backends through the environment; the next one must not inherit that.
        os.environ.clear()
        os.environ.update(saved_env)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run_scripts(scripts: Sequence[tuple[str, Callable[..., list[dict]]]], quick: bool, device, out,
                timeout: float | None = None, verbose: bool = True, budget: float | None = None) -> list[ScriptResult]:
    """Run ``(name, run)`` pairs in order; one failing does not stop the rest.

    ``budget``: seconds for the whole run. Each script gets at most what is left of it (and at most
    ``timeout``); once it is spent the remaining scripts are not started and are reported as failed.
    """
    device = resolve_device(device)
    results = []
    deadline = None if budget is None else time.perf_counter() + budget
    for name, run in scripts:
        limit = timeout
        if deadline is not None:
            left = deadline - time.perf_counter()
            if left <= 0:
                results.append(ScriptResult(name, 0.0, [], error=f"not run: the --budget of {budget:g} s was spent\n"))
                if verbose:
                    print(f"== {name}: not run, --budget spent", flush=True)
                continue
            limit = left if limit is None else min(limit, left)
        if verbose:
            print(f"== {name} ({'quick' if quick else 'full'}, {device})", flush=True)
        result = run_one(name, run, quick, device, out, limit)
        results.append(result)
        if verbose:
            print(result.error if result.error else format_table(result.rows), flush=True)
    return results


def _accepts_on_rows(run: Callable[..., list[dict]]) -> bool:
    """Whether ``run`` takes ``on_rows`` (a callback receiving rows as they are measured)."""
    target = getattr(run, "bench_module_run", run)
    try:
        return "on_rows" in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False


def _load(module_name: str) -> Callable[..., list[dict]]:
    def run(**kwargs):
        # Imported lazily so an import error counts against this script alone.
        return importlib.import_module(f"bench.{module_name}").run(**kwargs)

    try:
        run.bench_module_run = importlib.import_module(f"bench.{module_name}").run
    except Exception:  # noqa: BLE001 - reported when the script runs
        pass
    return run


def summary(results: Sequence[ScriptResult]) -> str:
    """One line per script: name, ok/FAIL, row count, seconds, kernels it wrote (parsed by the tests)."""
    lines = ["", f"{'script':<32} {'status':<6} {'rows':>5} {'seconds':>8}  kernels"]
    for r in results:
        kernels = ",".join(sorted({row["kernel"] for row in r.rows})) or "-"
        lines.append(f"{r.name:<32} {'FAIL' if r.error else 'ok':<6} {len(r.rows):>5} {r.seconds:>8.1f}  {kernels}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="scripts to run (default: every bench/bench_*.py)")
    add_run_args(parser)
    parser.add_argument("--timeout", type=float, default=None, help="seconds allowed per script (best effort)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run: scripts get what is left, later ones are skipped once spent")
    parser.add_argument("--plot", action="store_true", help="also write PNGs to OUT/plots (OUT/quick/plots)")
    parser.add_argument("--list", action="store_true", help="list the scripts and exit")
    args = parser.parse_args(argv)
    try:
        names = discover(args.names)
    except ValueError as exc:
        parser.error(str(exc))
    if args.list:
        print("\n".join(names))
        return 0
    device = resolve_device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    out = Path(args.out) if args.out else DEFAULT_OUT
    results = run_scripts([(n, _load(n)) for n in names], args.quick, device, out, args.timeout,
                          budget=args.budget)
    path = results_path(out, device, quick=args.quick)
    print(summary(results))
    print(f"results: {path}")
    if args.plot and path.exists():
        from bench.plot import plot_files

        for png in plot_files([path], path.parent / "plots"):
            print(f"plot: {png}")
    failed = [r.name for r in results if r.error]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
