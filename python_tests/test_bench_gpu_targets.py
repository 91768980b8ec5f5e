""".ci/gpu parses, and the Python it runs (``python -m bench.gpu_targets``) works on the CPU in quick mode;
the target ratios are computed from bench rows as the issue states them."""

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` (unlike `python -m pytest`) does not put the repo root on the path
    sys.path.insert(0, str(ROOT))

from bench import common, gpu_targets  # noqa: E402


def test_ci_gpu_script_parses():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    res = subprocess.run([bash, "-n", str(ROOT / ".ci" / "gpu")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    text = (ROOT / ".ci" / "gpu").read_text()
    assert "bench.gpu_targets --full" in text and "-m gpu" in text


def _row(kernel, provider, mode, x, t, config="c"):
    row = common.make_row(kernel, provider, mode, "time", "ms", "x", x, t)
    row["config"] = config
    return row


def _rows(peft=2.6, composed=2.0, dense=1.0, composed_fwd=1.05, seed=3.3):
    rows = [_row("q3r", "adamw", "step", 12, 2.0), _row("q3r", "triton", "step", 12, 2.2),
            _row("q3r", "torch", "step", 12, 9.0),
            _row("rank_controller", "ours", "step", 0, 1.0), _row("rank_controller", "upstream", "step", 0, seed),
            _row("rank_controller", "upstream", "step", 48, 99.0)]
    for r in (16, 64):
        rows += [_row("lora_matmul", "peft", "full", r, peft), _row("lora_matmul", "composed", "full", r, composed),
                 _row("lora_matmul", "dense", "forward", r, dense),
                 _row("lora_matmul", "composed", "forward", r, composed_fwd),
                 _row("lora_matmul", "triton", "full", r, 4.0)]
    # rows of other metrics never count as times
    rows.append(dict(_row("lora_matmul", "composed", "full", 16, 100.0), metric="launches"))
    return rows


def test_evaluate_targets_from_rows():
    targets = {t.name: t for t in gpu_targets.evaluate(_rows(), "cuda")}
    q3r = targets["q3r AdamQ3R(triton) / AdamW step, blocks=12"]
    assert q3r.measured == pytest.approx(1.1) and q3r.met and not q3r.info
    assert targets["q3r AdamQ3R(torch) / AdamW step, blocks=12"].info  # not the CUDA default route
    full16 = targets["lora full PEFT / composed, r=16"]
    assert full16.measured == pytest.approx(1.3) and full16.met and "1.300x (target >= 1.3x) met" in full16.line()
    assert targets["lora forward composed / dense, r=64"].measured == pytest.approx(1.05)
    triton = targets["lora full PEFT / triton, r=64"]
    assert triton.measured == pytest.approx(0.65) and triton.met is False and triton.line().endswith("info")
    assert targets["lora forward triton / dense, r=16"].line().endswith("not measured")
    ctrl = targets["controller decision upstream / ours, 0 layers resized"]
    assert ctrl.measured == pytest.approx(3.3) and ctrl.met

    missed = {t.name: t for t in gpu_targets.evaluate(_rows(peft=2.4, composed_fwd=1.2, seed=2.0), "cuda")}
    assert missed["lora full PEFT / composed, r=64"].line().endswith("MISSED")
    assert missed["lora forward composed / dense, r=16"].met is False
    assert missed["controller decision upstream / ours, 0 layers resized"].met is False


def test_evaluate_without_rows_reports_not_measured():
    targets = gpu_targets.evaluate([], "cuda")
    assert targets and all(t.measured is None and t.met is None for t in targets)
    assert all(t.line().endswith("not measured") for t in targets)
    assert {t.name.split()[0] for t in targets} == {"q3r", "lora", "controller"}


def test_quick_cpu_run_prints_targets_and_writes_csv(tmp_path):
    """The command .ci/gpu runs, in quick mode on the CPU, restricted to the fastest script."""
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_targets", "--quick", "--device", "cpu", "--out",
                           str(tmp_path), "--scripts", "bench_rank_controller"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("TARGET ")]
    ctrl = [line for line in lines if line.startswith("TARGET controller")]
    assert len(ctrl) == 1 and "not measured" not in ctrl[0], proc.stdout[-3000:]
    assert any("lora" in line and "not measured" in line for line in lines)  # not run here
    with open(tmp_path / "quick" / "gpu-targets.csv", newline="") as f:
        written = list(csv.DictReader(f))
    assert len(written) == len(lines) and any(r["measured"] for r in written)
    assert common.read_rows(common.results_path(tmp_path, "cpu", quick=True))


def test_lora_bench_restricted_to_target_providers():
    from bench import bench_lora_matmul

    rows = bench_lora_matmul.run(quick=True, device="cpu", ranks=(4,), providers=("dense", "composed"))
    assert {r["provider"] for r in rows} == {"dense", "composed"} and {r["x_value"] for r in rows} == {4}
    assert {r["metric"] for r in rows} >= {"time", "launches", "syncs"}
