"""``python -m bench.plot [CSV ...] [--out DIR]``: one PNG per device / kernel / metric / mode.

Left panel: the metric against ``x`` for every provider (p20-p80 band when measured). Right panel:
speedup over the ``torch`` eager reference at the same ``x`` and config (``torch / provider`` for
lower-is-better metrics such as time, ``provider / torch`` for bandwidth-like ones). Defaults: every
``bench/results/*.csv`` into ``bench/results/plots/<device-slug>/``.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from bench.common import DEFAULT_OUT, HIGHER_IS_BETTER, read_rows, slugify, x_sort_key

REFERENCE = "torch"


def _num(value: str) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def speedup(metric: str, reference: float, value: float) -> float:
    """How many times better ``value`` is than ``reference`` for this metric (> 1 means better)."""
    return value / reference if metric in HIGHER_IS_BETTER else reference / value


def group_rows(rows: Iterable[dict]) -> dict[tuple[str, str, str, str], list[dict]]:
    """Rows by ``(device, kernel, metric, mode)``, skipping rows without a ``p50``."""
    groups: dict[tuple[str, str, str, str], list[dict]] = defaultdict(list)
    for row in rows:
        if _num(row["p50"]) is not None:
            groups[(row["device"], row["kernel"], row["metric"], row["mode"])].append(row)
    return groups


def _series(rows: Sequence[dict]) -> dict[tuple[str, str], dict[str, dict]]:
    """``(provider, config) -> {x_value: row}``."""
    series: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
    for row in rows:
        series[(row["provider"], row["config"])][row["x_value"]] = row
    return series


def plot_group(key: tuple[str, str, str, str], rows: Sequence[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    device, kernel, metric, mode = key
    xs_all = sorted({r["x_value"] for r in rows}, key=x_sort_key)
    numeric = all(_num(x) is not None for x in xs_all)
    xpos = {x: (_num(x) if numeric else i) for i, x in enumerate(xs_all)}
    series = _series(rows)
    fig, (ax, ax_speed) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, ((provider, config), by_x) in enumerate(sorted(series.items())):
        xs = [x for x in xs_all if x in by_x]
        label = f"{provider} [{config}]" if config else provider
        color = colors[i % len(colors)]
        pos = [xpos[x] for x in xs]
        ax.plot(pos, [float(by_x[x]["p50"]) for x in xs], marker="o", label=label, color=color)
        lo = [_num(by_x[x]["p20"]) for x in xs]
        hi = [_num(by_x[x]["p80"]) for x in xs]
        if all(v is not None for v in lo + hi):
            ax.fill_between(pos, lo, hi, alpha=0.2, color=color)
        ref = series.get((REFERENCE, config), {})
        pairs = [(xpos[x], speedup(metric, float(ref[x]["p50"]), float(by_x[x]["p50"])))
                 for x in xs if x in ref and float(by_x[x]["p50"]) > 0 and float(ref[x]["p50"]) > 0]
        if pairs and provider != REFERENCE:
            ax_speed.plot(*zip(*pairs, strict=True), marker="o", label=label, color=color)
    unit = rows[0]["unit"]
    x_name = rows[0]["x_name"]
    for a in (ax, ax_speed):
        a.set_xlabel(x_name)
        if numeric and len(xs_all) > 1 and min(xpos.values()) > 0 and max(xpos.values()) / min(xpos.values()) >= 8:
            a.set_xscale("log", base=2)
            a.set_xticks(sorted(xpos.values()), [f"{v:g}" for v in sorted(xpos.values())])
            a.minorticks_off()
        if not numeric:
            a.set_xticks(range(len(xs_all)), xs_all, rotation=30)
        a.grid(True, alpha=0.3)
    ax.set_ylabel(f"{metric} ({unit})" if unit else metric)
    ax.set_title(f"{kernel} {mode}: {metric}")
    ax.legend(fontsize=7)
    ax_speed.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ylabel = f"speedup over {REFERENCE}" if metric == "time" else f"{metric}: times better than {REFERENCE}"
    ax_speed.set_ylabel(ylabel)
    ax_speed.set_title(f"higher is better; {device}")
    if ax_speed.lines[1:]:
        ax_speed.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_files(csv_paths: Iterable[str | Path], out_dir: str | Path) -> list[Path]:
    """Write the PNGs for every group in the CSV files; returns their paths."""
    rows = [r for p in csv_paths for r in read_rows(p)]
    written = []
    for key, group in sorted(group_rows(rows).items()):
        device, kernel, metric, mode = key
        name = "_".join(re.sub(r"[^A-Za-z0-9_.-]+", "-", part) for part in (kernel, metric, mode)) + ".png"
        written.append(plot_group(key, group, Path(out_dir) / slugify(device) / name))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", nargs="*", help="results CSV files (default: bench/results/*.csv)")
    parser.add_argument("--out", default=str(DEFAULT_OUT / "plots"), help="folder for the PNGs")
    args = parser.parse_args(argv)
    paths = args.csv or sorted(DEFAULT_OUT.glob("*.csv"))
    if not paths:
        print("no results CSV found; run `python -m bench --full` first")
        return 1
    for png in plot_files(paths, args.out):
        print(png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
