"""Shared helpers of every ``bench/bench_<stem>.py``: timing, peak memory, HBM bandwidth, rows, CSV files.

A bench script builds rows with :func:`make_row` and ends with ``main(run)``. Rows carry the measured
fields only; :func:`stamp_rows` adds the device / versions / commit / timestamp columns when they are
written, and :func:`append_rows` merges them into ``<out>/<device-slug>.csv`` (``<out>/quick/`` for quick
runs, so smoke runs never mix with real results), keeping the newest row per :data:`KEY`.

Conventional metrics (lower is better unless said): ``time`` in ``ms``, ``memory`` in ``MB`` (peak extra
allocation), ``bandwidth`` in ``GB/s`` and ``hbm_pct`` in ``%`` (both higher is better), ``launches`` and
``syncs`` (``count``, from :func:`cost_rows`: kernel launches and host syncs of one call, counted by
``lowrank_kernels.testing.count_gpu_cost`` on any device, so a CPU run shows the GPU cost too).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from unittest import mock

import torch

from lowrank_kernels import testing as _testing

SCHEMA = (
    "kernel", "provider", "mode", "metric", "unit", "x_name", "x_value", "config",
    "p50", "p20", "p80", "device", "torch", "triton", "commit", "timestamp",
)
KEY = ("kernel", "provider", "mode", "metric", "x_name", "x_value", "config", "device")
ROW_FIELDS = SCHEMA[:11]
HIGHER_IS_BETTER = frozenset({"bandwidth", "hbm_pct", "throughput", "tflops"})
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "bench" / "results"

# Peak HBM bandwidth in GB/s from the vendor data sheets; first matching pattern wins, so the more
# specific names (PCIe, NVL, memory size) come before the generic one.
_HBM_GBS: tuple[tuple[str, float], ...] = (
    (r"gh200", 4000.0),
    (r"h200", 4800.0),
    (r"h100.*nvl", 3900.0),
    (r"h100.*pcie", 2000.0),
    (r"h100", 3350.0),
    (r"h800.*pcie", 2000.0),
    (r"h800", 3350.0),
    (r"b200", 8000.0),
    (r"a100.*pcie.*80", 1935.0),
    (r"a100.*80", 2039.0),
    (r"a100", 1555.0),
    (r"a800.*80", 2039.0),
    (r"a10g", 600.0),
    (r"a10\b", 600.0),
    (r"l40s", 864.0),
    (r"l40", 864.0),
    (r"l4\b", 300.0),
    (r"v100", 900.0),
    (r"t4\b", 320.0),
    (r"rtx 4090", 1008.0),
    (r"rtx 3090", 936.0),
)


_MIN_CPU_BLOCKS = 7


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` means CUDA when available, else the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def _is_cuda(device) -> bool:
    return resolve_device(device).type == "cuda"


def time_fn(fn: Callable[[], object], device: str | torch.device | None = None, warmup: float = 25,
            rep: float = 100) -> tuple[float, float, float]:
    """Time ``fn()`` after warm-up; returns ``(p50_ms, p20_ms, p80_ms)``.

    ``warmup`` and ``rep`` are milliseconds of run time, as in ``triton.testing.do_bench``. CUDA uses
    ``do_bench`` (which flushes the L2 between calls); the CPU uses ``torch.utils.benchmark`` with all
    of torch's threads and takes the quantiles of its per-block times.
    """
    if _is_cuda(device):
        from triton.testing import do_bench

        p50, p20, p80 = do_bench(fn, warmup=int(max(warmup, 1)), rep=int(max(rep, 1)), quantiles=[0.5, 0.2, 0.8])
        return float(p50), float(p20), float(p80)
    import time

    from torch.utils.benchmark import Timer

    deadline = time.perf_counter() + warmup / 1000.0
    fn()
    while time.perf_counter() < deadline:
        fn()
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    measured = timer.blocked_autorange(min_run_time=rep / 1000.0)
    times, spent = list(measured.times), measured.number_per_run * sum(measured.times)
    # blocked_autorange may stop after one or two blocks, too few for quantiles: add blocks while
    # they are cheap (within twice the requested run time).
    while len(times) < _MIN_CPU_BLOCKS and spent < 2 * rep / 1000.0:
        block = timer.timeit(measured.number_per_run).times
        times += block
        spent += measured.number_per_run * sum(block)
    return _quantiles([t * 1e3 for t in times])


def _quantiles(times_ms: list[float]) -> tuple[float, float, float]:
    """``(p50, p20, p80)`` of a list of times."""
    p50, p20, p80 = torch.quantile(torch.tensor(times_ms, dtype=torch.float64),
                                   torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
    return p50, p20, p80


def time_interleaved(fns: dict[str, Callable[[], object]], device: str | torch.device | None = None,
                     warmup: float = 25, rep: float = 100) -> dict[str, tuple[float, float, float]]:
    """``{name: (p50_ms, p20_ms, p80_ms)}`` for several functions whose times will be compared.

    On the CPU the calls alternate (one call of each per round, the order rotating) for at least 7 rounds and
    until the rounds have taken ``rep`` ms per function in all, so a machine that slows down or speeds up
    during the measurement shifts every function alike instead of whichever ran then (the shared 2-core
    development VM drifted by up to 40% between runs). CUDA timings are stable: each function goes through
    :func:`time_fn`.
    """
    if _is_cuda(device):
        return {name: time_fn(fn, device, warmup, rep) for name, fn in fns.items()}
    import time

    names = list(fns)
    for name in names:
        deadline = time.perf_counter() + warmup / 1000.0
        fns[name]()
        while time.perf_counter() < deadline:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    spent, rnd = 0.0, 0
    while rnd < _MIN_CPU_BLOCKS or spent < rep / 1000.0 * len(names):
        for name in names[rnd % len(names):] + names[:rnd % len(names)]:
            start = time.perf_counter()
            fns[name]()
            elapsed = time.perf_counter() - start
            times[name].append(elapsed * 1e3)
            spent += elapsed
        rnd += 1
    return {name: _quantiles(times[name]) for name in names}


def peak_memory_mb(fn: Callable[[], object], device: str | torch.device | None = None) -> float | None:
    """Peak memory ``fn()`` allocates on top of what was allocated when it was called, in MiB.

    Measured above the current allocation so the inputs a script keeps for other providers do not
    count. ``None`` on the CPU (no allocator statistics there).
    """
    dev = resolve_device(device)
    if dev.type != "cuda":
        return None
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    fn()
    torch.cuda.synchronize(dev)
    return (torch.cuda.max_memory_allocated(dev) - base) / 2**20


def device_name(device: str | torch.device | None = None) -> str:
    """Marketing name of the device (``NVIDIA H100 80GB HBM3``) or the CPU model."""
    return _testing.device_name(resolve_device(device))


def hbm_peak_gbs(device: str | torch.device | None = None) -> float | None:
    """Peak memory bandwidth (GB/s) of a known GPU, for % of HBM bandwidth; ``None`` if unknown or CPU."""
    if not _is_cuda(device):
        return None
    name = device_name(device).lower()
    for pattern, gbs in _HBM_GBS:
        if re.search(pattern, name):
            return gbs
    return None


slugify = _testing.slugify


def device_slug(device: str | torch.device | None = None) -> str:
    """File-name form of :func:`device_name`, e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu-amd-epyc``."""
    return slugify(device_name(device))


def _git_commit() -> str:
    return _testing.git_commit(REPO_ROOT)


def env_info(device: str | torch.device | None = None) -> dict[str, str]:
    """The columns stamped on every row: device name, torch / triton versions, git commit, UTC timestamp."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # triton missing or broken: results are still worth recording
        triton_version = ""
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": _git_commit(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def format_value(value) -> str:
    """How a value is written to CSV; also used for de-dup keys, so read-back rows compare equal."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return format(value, ".6g")
    if isinstance(value, dict):
        return ";".join(f"{k}={format_value(v)}" for k, v in sorted(value.items()))
    if isinstance(value, (tuple, list)):
        return "x".join(format_value(v) for v in value)
    return str(value)


def make_row(kernel: str, provider: str, mode: str, metric: str, unit: str, x_name: str, x_value,
             p50: float | None, p20: float | None = None, p80: float | None = None, config=None) -> dict:
    """One measurement. ``config`` is a string or a dict (written as sorted ``k=v;k=v``)."""
    return {
        "kernel": kernel, "provider": provider, "mode": mode, "metric": metric, "unit": unit,
        "x_name": x_name, "x_value": x_value, "config": format_value(config),
        "p50": None if p50 is None else float(p50),
        "p20": None if p20 is None else float(p20),
        "p80": None if p80 is None else float(p80),
    }


def bandwidth_rows(kernel: str, provider: str, mode: str, x_name: str, x_value, nbytes: int, p50: float,
                   p20: float | None = None, p80: float | None = None, device: str | torch.device | None = None,
                   config=None) -> list[dict]:
    """``bandwidth`` (GB/s) row, plus ``hbm_pct`` when the device's peak is known, for a kernel that moves
    ``nbytes`` (reads + writes) in ``p50`` ms. The fast time quantile becomes the high bandwidth one."""
    def gbs(ms):
        return None if not ms else nbytes / (ms * 1e-3) / 1e9

    rows = [make_row(kernel, provider, mode, "bandwidth", "GB/s", x_name, x_value, gbs(p50), gbs(p80), gbs(p20),
                     config)]
    peak = hbm_peak_gbs(device)
    if peak:
        pct = [None if v is None else 100.0 * v / peak for v in (gbs(p50), gbs(p80), gbs(p20))]
        rows.append(make_row(kernel, provider, mode, "hbm_pct", "%", x_name, x_value, *pct, config=config))
    return rows


def backend_env(name: str):
    """Context manager: run the block with ``LOWRANK_KERNELS_BACKEND=name`` (restored afterwards)."""
    return mock.patch.dict(os.environ, {"LOWRANK_KERNELS_BACKEND": name})


#: Providers whose launches are not counted: a compiled graph calls its kernels without going through the
#: dispatcher (and a dispatch mode around it may trigger a recompile), so a count would be meaningless.
UNCOUNTED_PROVIDERS = ("torch_compile",)


def cost_rows(kernel: str, provider: str, mode: str, fn: Callable[[], object], x_name: str, x_value,
              config=None, per: int = 1) -> list[dict]:
    """``launches`` and ``syncs`` rows (unit ``count``) of one call of ``fn``, divided by ``per`` (e.g. the
    steps one call makes, for amortised figures). ``[]`` for :data:`UNCOUNTED_PROVIDERS`.

    Run ``fn`` once before (a warm-up): a Triton launch is counted only once triton is imported, and first
    calls may autotune. Counted as ``lowrank_kernels.testing.count_gpu_cost`` counts: aten ops that launch
    a kernel plus Triton launches; host reads of tensor data and ops whose output size needs the host.
    """
    if provider.split("+")[0] in UNCOUNTED_PROVIDERS:
        return []
    from lowrank_kernels.testing import count_gpu_cost

    with count_gpu_cost() as cost:
        fn()
    return [make_row(kernel, provider, mode, "launches", "count", x_name, x_value, cost.launches / per, config=config),
            make_row(kernel, provider, mode, "syncs", "count", x_name, x_value, cost.syncs / per, config=config)]


def mode_rows(kernel: str, provider: str, mode: str, fn: Callable[[], object], device, rep: float, x_name: str,
              x_value, config: dict | None = None, fwd_bytes: int | None = None) -> list[dict]:
    """Time ``fn`` (``warmup = rep / 4``) and return its time row, its peak-memory row (CUDA only),
    for ``mode == "forward"`` with ``fwd_bytes`` the bandwidth rows, then its :func:`cost_rows`."""
    p50, p20, p80 = time_fn(fn, device, warmup=rep / 4, rep=rep)
    rows = [make_row(kernel, provider, mode, "time", "ms", x_name, x_value, p50, p20, p80, config)]
    mem = peak_memory_mb(fn, device)
    if mem is not None:
        rows.append(make_row(kernel, provider, mode, "memory", "MB", x_name, x_value, mem, config=config))
    if mode == "forward" and fwd_bytes is not None:
        rows += bandwidth_rows(kernel, provider, mode, x_name, x_value, fwd_bytes, p50, p20, p80, device, config)
    return rows + cost_rows(kernel, provider, mode, fn, x_name, x_value, config)


def stamp_rows(rows: Iterable[dict], info: dict[str, str]) -> list[dict[str, str]]:
    """Rows as CSV strings in :data:`SCHEMA` order, with the environment columns filled in."""
    out = []
    for row in rows:
        missing = [f for f in ("kernel", "provider", "mode", "metric", "p50") if f not in row]
        if missing:
            raise ValueError(f"bench row {row!r} lacks {missing}")
        full = {f: format_value(row.get(f)) for f in ROW_FIELDS}
        full.update({f: format_value(row.get(f) or info.get(f, "")) for f in SCHEMA[11:]})
        out.append(full)
    return out


def read_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a results CSV (missing columns read as empty)."""
    with open(path, newline="") as f:
        return [{k: (r.get(k) or "") for k in SCHEMA} for r in csv.DictReader(f)]


def x_sort_key(value: str):
    """Numeric ``x`` values in numeric order, then any others as text."""
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def merge_rows(old: Sequence[dict], new: Sequence[dict]) -> list[dict]:
    """Union of ``old`` and ``new``, one row per :data:`KEY` (a ``new`` row replaces an old one), sorted."""
    merged: dict[tuple, dict] = {}
    for row in (*old, *new):
        merged[tuple(row[k] for k in KEY)] = row
    return sorted(merged.values(), key=lambda r: (r["kernel"], r["metric"], r["mode"], r["config"], r["x_name"],
                                                   x_sort_key(r["x_value"]), r["provider"], r["device"]))


def write_rows(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SCHEMA, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def results_path(out: str | os.PathLike, device: str | torch.device | None = None, quick: bool = False) -> Path:
    """``<out>/<slug>.csv``, or ``<out>/quick/<slug>.csv`` for quick runs."""
    out = Path(out)
    return (out / "quick" if quick else out) / f"{device_slug(device)}.csv"


def append_rows(path: str | os.PathLike, rows: Sequence[dict]) -> list[dict]:
    """Merge stamped ``rows`` into the CSV at ``path`` (created if absent); returns what was written."""
    old = read_rows(path) if Path(path).exists() else []
    merged = merge_rows(old, rows)
    write_rows(path, merged)
    return merged


def format_table(rows: Sequence[dict]) -> str:
    """Plain fixed-width table of rows for the terminal."""
    cols = ("kernel", "provider", "mode", "metric", "x_name", "x_value", "config", "p50", "p20", "p80", "unit")
    cells = [[format_value(r.get(c)) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(line[i]) for line in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) for line in cells]
    return "\n".join(lines)


def add_run_args(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="quick", action="store_true", default=True,
                      help="tiny shapes, seconds on a CPU (default)")
    mode.add_argument("--full", dest="quick", action="store_false", help="the issue's target shapes (GPU)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--out", default=None,
                        help="results folder (default bench/results); quick runs go to OUT/quick/")


def main(run: Callable[..., list[dict]], argv: Sequence[str] | None = None) -> list[dict]:
    """Command line of one bench script: run it, merge its rows into the results CSV, print them."""
    parser = argparse.ArgumentParser(description=(run.__module__ or "bench") + " benchmark")
    add_run_args(parser)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    rows = stamp_rows(run(quick=args.quick, device=str(device)), env_info(device))
    path = results_path(args.out or DEFAULT_OUT, device, quick=args.quick)
    append_rows(path, rows)
    print(format_table(rows))
    print(f"\n{len(rows)} rows -> {path}")
    return rows


def replace_between(text: str, start_marker: str, end_marker: str, block: str) -> str:
    """``text`` with everything between the two marker lines replaced by ``block`` (the README's generated
    tables); ``ValueError`` when the markers are missing or out of order."""
    start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 or end < start:
        raise ValueError(f"README has no {start_marker} ... {end_marker} markers")
    return text[: start + len(start_marker)] + "\n" + block + "\n" + text[end:]
