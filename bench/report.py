"""``python -m bench.report [--check]``: the Performance table of ``README.md``, generated from the results CSVs.

The table sits between ``<!-- bench-table:start -->`` and ``<!-- bench-table:end -->``; nothing in it is
typed by hand. One table per device file ``bench/results/<device-slug>.csv`` (quick runs are never
read). For every kernel, mode and config where one of our providers (``triton``, ``cuda``, or ``ours``
for an op that is PyTorch code of ours) was measured beside another provider, the row shows the largest
``x`` measured there (the target shape) with our median time and speedups: over ``torch`` eager, over
``torch.compile`` of it, and over each library a user would otherwise pick (every other provider), then the
GPU cost of one call (``launches`` and ``syncs`` metrics, counted on any device): ours and, after the slash,
``torch``'s. ``--check`` exits 1 when README's table differs from the data. ``--backend-table`` also rewrites
``lowrank_kernels/backend.py``'s ``TABLE`` from the measured ``composed`` and ``triton`` rows.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from bench import tables
from bench.common import DEFAULT_OUT, REPO_ROOT, append_rows, read_rows, replace_between, slugify, x_sort_key

START = "<!-- bench-table:start -->"
END = "<!-- bench-table:end -->"
# "ours" / "lowrank_kernels": our op where it is not a kernel of its own (e.g. a PyTorch algorithm).
OURS = ("triton", "cuda", "ours", "lowrank_kernels", "composed")


# Kernels whose ``torch`` provider is this library's own PyTorch path (not plain torch): AdamQ3R's step, whose
# baselines are AdamW and the upstream algorithm. Their ``torch`` rows are ours (on a CPU the only ones).
TORCH_IS_OURS = {"q3r"}


def is_ours(provider: str, kernel: str = "") -> bool:
    """``triton`` and its variants such as ``triton+warm_start`` are ours; so is ``torch`` of :data:`TORCH_IS_OURS`."""
    base = provider.split("+")[0]
    return base in OURS or (base == REFERENCE and kernel in TORCH_IS_OURS)
REFERENCE = "torch"
COMPILED = "torch_compile"
README = REPO_ROOT / "README.md"
EMPTY = ("_No benchmark results committed yet. On a GPU: `python -m bench --full`, then "
         "`python -m bench.report` (see `bench/README.md`)._")


def _num(value: str) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if out > 0 else None


def _ratio(reference: float | None, ours: float | None) -> str:
    if not (reference and ours):
        return "–"
    ratio = reference / ours
    return f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.2g}x"


def _ms(value: float | None) -> str:
    return f"{value:.3g}" if value else "–"


def _count(value: str) -> float | None:
    """A ``launches`` / ``syncs`` value (0 is a value here, unlike a time)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if out >= 0 else None


def _counts(ours: float | None, torch_: float | None) -> str:
    if ours is None:
        return "–"
    return f"{ours:.4g}" + (f" / {torch_:.4g}" if torch_ is not None else "")


def _header(rows: Sequence[dict]) -> str:
    newest = max(rows, key=lambda r: r["timestamp"])
    commits = sorted({r["commit"] for r in rows if r["commit"]})
    dates = sorted({r["timestamp"][:10] for r in rows if r["timestamp"]})
    when = dates[0] if len(dates) <= 1 else f"{dates[0]} to {dates[-1]}"
    commit = newest["commit"] or (commits[-1] if commits else "")
    commit = (f"commit `{commit}`" + (f" (+{len(commits) - 1} older)" if len(commits) > 1 else "")
              if commit else "commit not recorded")
    return (f"**{newest['device']}** — torch {newest['torch']}, triton {newest['triton'] or 'n/a'}, "
            f"{commit}, measured {when or 'n/a'}.")


def device_table(rows: Sequence[dict]) -> str:
    """Markdown table of one device's rows (median time; speedup = other's time / ours)."""
    time: dict[tuple, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    memory: dict[tuple, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    launches: dict[tuple, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    syncs: dict[tuple, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    x_names: dict[tuple, str] = {}
    for r in rows:
        store = {"time": time, "memory": memory, "launches": launches, "syncs": syncs}.get(r["metric"])
        value = _count(r["p50"]) if r["metric"] in ("launches", "syncs") else _num(r["p50"])
        if store is None or value is None:
            continue
        key = (r["kernel"], r["mode"], r["config"])
        store[key][r["x_value"]][r["provider"]] = value
        x_names.setdefault(key, r["x_name"])
    lines = ["| kernel | mode | shape | ours | ours ms | torch ms | vs torch | vs torch.compile | vs alternatives "
             "| memory vs torch | launches ours / torch | syncs ours / torch |",
             "|---|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for key in sorted(time):
        by_x = time[key]
        kernel = key[0]
        mine = [x for x in by_x if any(is_ours(p, kernel) for p in by_x[x])]
        usable = [x for x in mine if not all(is_ours(p, kernel) for p in by_x[x])]
        if not usable:
            continue
        x = max(usable, key=x_sort_key)
        kernel, mode, config = key
        shape = f"{x_names[key]}={x}" + (f" ({config.replace(';', ', ')})" if config else "")
        providers = by_x[x]
        mem = memory.get(key, {}).get(x, {})
        lau = launches.get(key, {}).get(x, {})
        syn = syncs.get(key, {}).get(x, {})
        for ours in sorted(p for p in providers if is_ours(p, kernel)):
            t = providers[ours]
            alternatives = ", ".join(f"{p} {_ratio(providers[p], t)}" for p in sorted(providers)
                                     if not is_ours(p, kernel) and p not in (REFERENCE, COMPILED)) or "–"
            ref = providers.get(REFERENCE)
            lines.append(f"| {kernel} | {mode} | {shape} | {ours} | {_ms(t)} | {_ms(ref)} | {_ratio(ref, t)} | "
                         f"{_ratio(providers.get(COMPILED), t)} | {alternatives} | "
                         f"{_ratio(mem.get(REFERENCE), mem.get(ours))} | "
                         f"{_counts(lau.get(ours), lau.get(REFERENCE))} | "
                         f"{_counts(syn.get(ours), syn.get(REFERENCE))} |")
    if len(lines) == 2:
        return "_No kernel here has one of our providers and something to compare it with._"
    return "\n".join(lines)


def render(results_dir: str | Path = DEFAULT_OUT) -> str:
    """The whole generated block (without the markers) from ``results_dir/*.csv``."""
    parts = ["<!-- generated by `python -m bench.report` from bench/results/*.csv: do not edit by hand -->", ""]
    # GPUs first: they are what the kernels are for; CPU tables document the fallback paths.
    files = sorted(Path(results_dir).glob("*.csv"), key=lambda p: (p.stem.startswith("cpu"), p.stem))
    tables = []
    for path in files:
        rows = read_rows(path)
        if rows:
            tables.append(_header(rows) + "\n\n" + device_table(rows))
    parts.append("\n\n".join(tables) if tables else EMPTY)
    if tables:
        parts += ["", "Speedup = the other provider's median time / ours (higher is better; memory likewise, from "
                  "peak allocation). Launches / syncs: kernel launches and host syncs of one call (per step where "
                  "the mode is a step), counted by `lowrank_kernels.testing.count_gpu_cost`; – where not measured. "
                  "Shape: the largest size measured. Plots: `python -m bench.plot`."]
    return "\n".join(parts)


def replace_block(text: str, block: str) -> str:
    """``text`` with everything between the markers replaced by ``block``; ``ValueError`` without markers."""
    return replace_between(text, START, END, block)


def merge_into(results_dir: str | Path, csv_paths: Sequence[str | Path]) -> list[Path]:
    """Merge result files (e.g. a GPU run's ``$OUT/*.csv``) into ``results_dir/<device-slug>.csv`` by device."""
    by_device: dict[str, list[dict]] = defaultdict(list)
    for path in csv_paths:
        for row in read_rows(path):
            by_device[slugify(row["device"])].append(row)
    written = []
    for slug, rows in sorted(by_device.items()):
        append_rows(Path(results_dir) / f"{slug}.csv", rows)
        written.append(Path(results_dir) / f"{slug}.csv")
    return written


BACKEND_PY = REPO_ROOT / "lowrank_kernels" / "backend.py"
TABLE_START = "# backend-table:start"
TABLE_END = "# backend-table:end"


def _config_dict(config: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in config.split(";") if "=" in item)


def backend_table(results_dir: str | Path = DEFAULT_OUT) -> dict[str, str]:
    """``backend.TABLE`` from the results: per ``(op, cuda, dtype, shape class)`` the faster of ``composed`` and
    ``triton`` in mode ``full`` (forward + backward), summing the median times of every measured shape of the
    class. Only GPU files count (the table decides for CUDA tensors) and only shapes where both were timed."""
    from lowrank_kernels import backend

    totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for path in sorted(Path(results_dir).glob("*.csv")):
        if path.stem.startswith("cpu"):
            continue
        times: dict[tuple, dict[str, float]] = defaultdict(dict)
        for r in read_rows(path):
            value = _num(r["p50"])
            if (r["kernel"] in backend.COMPOSED_OPS and r["metric"] == "time" and r["mode"] == "full"
                    and r["provider"] in ("composed", "triton") and value is not None and r["x_name"] == "r"):
                times[(r["kernel"], r["config"], r["x_value"])][r["provider"]] = value
        for (kernel, config, rank), by in times.items():
            cfg = _config_dict(config)
            if len(by) < 2 or not {"M", "in", "out", "dtype"} <= set(cfg):
                continue
            cls = backend.shape_class(int(cfg["M"]), int(cfg["in"]), int(cfg["out"]), int(float(rank)))
            key = f"{kernel}/cuda/{cfg['dtype']}/{cls}"
            for provider, t in by.items():
                totals[key][provider] += t
    return {key: min(by, key=by.get) for key, by in sorted(totals.items())}


def render_backend_table(table: dict[str, str]) -> str:
    if not table:
        return "TABLE: dict[str, str] = {}"
    body = "".join(f"    {key!r}: {value!r},\n" for key, value in sorted(table.items()))
    return "TABLE: dict[str, str] = {\n" + body + "}"


def replace_backend_table(text: str, table: dict[str, str]) -> str:
    """``backend.py``'s text with the block between the table markers replaced; ``ValueError`` without them."""
    start, end = text.find(TABLE_START), text.find(TABLE_END)
    if start < 0 or end < start:
        raise ValueError(f"backend.py has no {TABLE_START} ... {TABLE_END} markers")
    return text[: start + len(TABLE_START)] + "\n" + render_backend_table(table) + "\n" + text[end:]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(DEFAULT_OUT), help="folder of <device-slug>.csv files")
    parser.add_argument("--readme", default=str(README), help="file holding the markers")
    parser.add_argument("--check", action="store_true", help="exit 1 if the README table differs from the data")
    parser.add_argument("--merge", nargs="+", metavar="CSV", default=(),
                        help="first merge these result files (e.g. a GPU run's OUT/*.csv) into --results")
    parser.add_argument("--backend-table", nargs="?", const=str(BACKEND_PY), default=None, metavar="BACKEND_PY",
                        help="also rewrite backend.py's TABLE (composed vs triton per shape class) from the results")
    args = parser.parse_args(argv)
    for path in merge_into(args.results, args.merge):
        print(f"merged into {path}")
    if args.backend_table:
        table = backend_table(args.results)
        target = Path(args.backend_table)
        target.write_text(replace_backend_table(target.read_text(), table))
        print(f"{target}: TABLE with {len(table)} entries" + "".join(f"\n  {k}: {v}" for k, v in table.items()))
    readme = Path(args.readme)
    current = readme.read_text()
    wanted = tables.replace_block(replace_block(current, render(args.results)), tables.render(args.results))
    if args.check:
        if wanted != current:
            sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), wanted.splitlines(True),
                                                       str(readme), "generated"))
            print(f"\n{readme} is out of date: run `python -m bench.report`", file=sys.stderr)
            return 1
        print(f"{readme}: performance table matches {args.results}")
        return 0
    if wanted != current:
        readme.write_text(wanted)
        print(f"updated {readme}")
    else:
        print(f"{readme} already up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
