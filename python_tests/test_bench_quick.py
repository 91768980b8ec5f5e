"""The quick benchmark suite runs (as CI runs it) and writes rows with the fixed schema.

One ``python -m bench --quick`` subprocess runs every ``bench/bench_*.py`` into a temporary folder;
each script then gets its own test over its rows. The runner itself is checked with fake scripts.
"""

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` (unlike `python -m pytest`) does not put the repo root on the path
    sys.path.insert(0, str(ROOT))

from bench import __main__ as runner  # noqa: E402
from bench import common  # noqa: E402

SCRIPTS = runner.discover()
QUICK_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_quick")
    env = {k: v for k, v in os.environ.items() if k != "LOWRANK_KERNELS_BACKEND"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--device", "cpu", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=QUICK_TIMEOUT_S)
    seconds = time.perf_counter() - start
    csvs = list((out / "quick").glob("*.csv"))
    rows = common.read_rows(csvs[0]) if len(csvs) == 1 else []
    header = next(csv.reader(open(csvs[0], newline=""))) if len(csvs) == 1 else []
    return proc, rows, header, seconds


def test_quick_suite_exit_status_and_schema(quick_run):
    proc, rows, header, seconds = quick_run
    print(proc.stdout[-3000:], f"\nquick suite took {seconds:.1f} s")
    assert proc.returncode == 0, f"python -m bench --quick failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    if SCRIPTS:
        assert tuple(header) == common.SCHEMA
        assert {r["device"] for r in rows} == {common.device_name("cpu")}


@pytest.mark.parametrize("script", SCRIPTS)
def test_quick_rows_of_script(quick_run, script):
    proc, rows, _, _ = quick_run
    summary = [line.split() for line in proc.stdout.splitlines() if line.startswith(script + " ")]
    assert summary and summary[-1][1] == "ok", f"{script} failed in the quick suite:\n{proc.stdout[-4000:]}"
    _, _, count, seconds, kernels = summary[-1]
    print(f"{script}: {count} rows in {seconds} s")
    mine = [r for r in rows if r["kernel"] in kernels.split(",")]
    assert int(count) > 0 and len(mine) >= int(count)
    assert all(r["provider"] and r["mode"] and r["metric"] and r["unit"] and r["x_name"] for r in mine)
    values = [r["p50"] for r in mine]
    assert all(v == "" or float(v) >= 0 for v in values)
    assert any(v != "" and float(v) > 0 for v in values), f"{script} measured nothing"


@pytest.mark.parametrize("kernel, modes", [("lora_matmul", {"forward", "backward", "full"}),
                                           ("lowrank_matmul", {"forward", "backward", "full"}),
                                           ("q3r", {"step", "update"})])
def test_quick_rows_record_launches_and_syncs(quick_run, kernel, modes):
    """Every timed provider of these scripts also has ``launches`` and ``syncs`` rows (count, >= 0) in each mode;
    the composed LoRA path launches fewer kernels than PEFT's layer."""
    _, rows, _, _ = quick_run
    mine = [r for r in rows if r["kernel"] == kernel]
    timed = {(r["provider"], r["mode"], r["x_value"]) for r in mine if r["metric"] == "time"}
    assert timed and {m for _, m, _ in timed} == modes
    for metric in ("launches", "syncs"):
        counted = [r for r in mine if r["metric"] == metric]
        got = {(r["provider"], r["mode"], r["x_value"]): float(r["p50"]) for r in counted}
        assert set(got) == {t for t in timed if not t[0].startswith("torch_compile")}, metric
        assert all(v >= 0 for v in got.values()) and {r["unit"] for r in counted} == {"count"}
    launches = {(r["provider"], r["mode"], r["x_value"]): float(r["p50"]) for r in mine if r["metric"] == "launches"}
    assert all(launches[t] > 0 for t in launches)
    if kernel == "lora_matmul" and any(p == "peft" for p, _, _ in launches):
        for (provider, mode, x), n in launches.items():
            if provider == "composed":
                assert n < launches[("peft", mode, x)], (mode, x)


def test_cost_rows_count_one_call():
    import torch

    x = torch.randn(8, 8)
    rows = common.cost_rows("k", "ours", "forward", lambda: (x @ x).sum().item(), "n", 8, {"r": 2}, per=2)
    assert [(r["metric"], r["unit"], r["p50"]) for r in rows] == [("launches", "count", 1.0), ("syncs", "count", 0.5)]
    assert common.cost_rows("k", "torch_compile", "forward", lambda: None, "n", 8) == []


def _good_run(quick=True, device=None):
    assert quick is True and device == "cpu"
    return [common.make_row("fake", p, "forward", "time", "ms", "n", n, t, config={"r": 4})
            for p, t in (("torch", 2.0), ("triton", 1.0)) for n in (8, 16)]


def _bad_run(quick=True, device=None):
    raise RuntimeError("kernel exploded")


def test_runner_reports_failures_and_keeps_going(tmp_path, monkeypatch):
    def env_changer(quick=True, device=None):
        os.environ["LOWRANK_KERNELS_BACKEND"] = "torch"
        return "not a list"

    monkeypatch.delenv("LOWRANK_KERNELS_BACKEND", raising=False)
    scripts = [("bench_bad", _bad_run), ("bench_env", env_changer), ("bench_good", _good_run)]
    results = runner.run_scripts(scripts, True, "cpu", tmp_path, verbose=False)
    assert [r.name for r in results] == ["bench_bad", "bench_env", "bench_good"]
    assert "kernel exploded" in results[0].error and "list of dicts" in results[1].error and results[2].error is None
    assert "LOWRANK_KERNELS_BACKEND" not in os.environ  # a script's environment changes are undone
    rows = common.read_rows(tmp_path / "quick" / f"{common.device_slug('cpu')}.csv")
    assert len(rows) == 4 and {r["provider"] for r in rows} == {"torch", "triton"}
    assert all(r["torch"] and r["timestamp"] and r["config"] == "r=4" for r in rows)
    assert "bench_bad" in runner.summary(results) and "FAIL" in runner.summary(results)

    # Again through main(): same rows de-duplicated, non-zero exit because one script failed.
    monkeypatch.setattr(runner, "discover", lambda names=(): ["bench_good", "bench_bad"])
    monkeypatch.setattr(runner, "_load", {"bench_good": _good_run, "bench_bad": _bad_run}.__getitem__)
    assert runner.main(["--quick", "--device", "cpu", "--out", str(tmp_path)]) == 1
    assert len(common.read_rows(tmp_path / "quick" / f"{common.device_slug('cpu')}.csv")) == 4
    assert not list(tmp_path.glob("*.csv"))  # quick rows never land next to full results


def test_discover_names():
    assert runner.discover() == SCRIPTS
    for script in SCRIPTS[:1]:
        stem = script.removeprefix("bench_")
        assert runner.discover([stem, script, f"bench/{script}.py"]) == [script] * 3
    with pytest.raises(ValueError, match="no benchmark script 'nope'"):
        runner.discover(["nope"])


def test_time_fn_cpu_quantiles_are_ordered():
    import torch

    x = torch.randn(32, 32)
    p50, p20, p80 = common.time_fn(lambda: x @ x, "cpu", warmup=1, rep=5)
    assert 0 < p20 <= p50 <= p80


def test_rows_streamed_before_a_failure_are_kept(tmp_path):
    """A script that hands rows to ``on_rows`` and then fails (or times out) keeps what it measured."""

    def streaming(quick=True, device=None, on_rows=None):
        first = [common.make_row("fake", "torch", "forward", "time", "ms", "n", 8, 2.0)]
        on_rows(first)
        raise RuntimeError("second shape exploded")

    def slow(quick=True, device=None, on_rows=None):
        on_rows([common.make_row("slow", "torch", "forward", "time", "ms", "n", 8, 1.0)])
        time.sleep(5)
        return []

    results = runner.run_scripts([("bench_streaming", streaming), ("bench_slow", slow)], True, "cpu", tmp_path,
                                 timeout=0.5, verbose=False)
    assert "second shape exploded" in results[0].error and "1 rows measured before the failure" in results[0].error
    assert "exceeded --timeout" in results[1].error and len(results[1].rows) == 1
    rows = common.read_rows(tmp_path / "quick" / f"{common.device_slug('cpu')}.csv")
    assert sorted(r["kernel"] for r in rows) == ["fake", "slow"] and all(r["timestamp"] for r in rows)
    assert "FAIL" in runner.summary(results)


def test_budget_limits_the_whole_run(tmp_path):
    """--budget: a script gets only what is left of the run's seconds, and once they are spent the rest
    are not started (reported as failed), so a GPU run fits its slot by construction."""
    ran = []

    def slow(quick=True, device=None, on_rows=None):
        ran.append("slow")
        on_rows([common.make_row("slow", "torch", "forward", "time", "ms", "n", 8, 1.0)])
        time.sleep(5)
        return []

    def later(quick=True, device=None):
        ran.append("later")
        return [common.make_row("later", "torch", "forward", "time", "ms", "n", 8, 1.0)]

    start = time.perf_counter()
    results = runner.run_scripts([("bench_slow", slow), ("bench_later", later)], True, "cpu", tmp_path,
                                 timeout=60, verbose=False, budget=0.5)
    assert time.perf_counter() - start < 3
    assert ran == ["slow"]
    assert "exceeded --timeout" in results[0].error and len(results[0].rows) == 1
    assert "--budget of 0.5 s was spent" in results[1].error and not results[1].rows
    assert runner.summary(results).count("FAIL") == 2


def test_time_interleaved_cpu_alternates_and_orders_quantiles():
    calls = []

    def fast():
        calls.append("fast")

    def slow():
        calls.append("slow")
        time.sleep(0.004)

    out = common.time_interleaved({"fast": fast, "slow": slow}, "cpu", warmup=0, rep=20)
    assert set(out) == {"fast", "slow"}
    for p50, p20, p80 in out.values():
        assert 0 < p20 <= p50 <= p80
    assert out["slow"][0] > 3.5 > out["fast"][0]
    measured = calls[2:]  # after one warm-up call each
    assert measured.count("fast") == measured.count("slow") >= 7
    assert "fast" in measured[:2] and "slow" in measured[:2]  # alternating, not one after the other
