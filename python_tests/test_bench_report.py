"""The README Performance table matches the committed results; CSV merge and report logic on synthetic data."""

import csv
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` (unlike `python -m pytest`) does not put the repo root on the path
    sys.path.insert(0, str(ROOT))

from bench import common, report, tables  # noqa: E402

DEVICE = "NVIDIA H100 80GB HBM3"
INFO = {"device": DEVICE, "torch": "2.13.0", "triton": "3.9.0", "commit": "abc1234",
        "timestamp": "2026-01-02T03:04:05Z"}


def _rows(times: dict[str, float], x=4096, mode="forward", config=None, metric="time", unit="ms", info=INFO):
    rows = [common.make_row("lora_matmul", p, mode, metric, unit, "M", x, t, 0.9 * t, 1.1 * t, config=config)
            for p, t in times.items()]
    return common.stamp_rows(rows, info)


def test_readme_table_matches_committed_results():
    text = (ROOT / "README.md").read_text()
    assert report.START in text and report.END in text, "README lacks the bench-table markers"
    assert report.replace_block(text, report.render(ROOT / "bench" / "results")) == text, (
        "README's Performance table is stale: run `python -m bench.report`")


def test_readme_result_tables_match_committed_files():
    text = (ROOT / "README.md").read_text()
    assert tables.replace_block(text, tables.render(ROOT / "bench" / "results")) == text, (
        "README's result tables are stale: run `python -m bench.report`")
    assert "Demo:" in text and "Rank controller: loss spike" in text


def test_result_table_round_trip(tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "env_info", lambda device=None: INFO)
    path = tables.write_table("spike", "A title", ["what", "n", "value"], [["a", 1200, 0.25], ["b", 3, -1.5]],
                              "python -m bench.x", notes="a note", out=tmp_path)
    assert path.name.startswith("spike-") and path.suffix == ".json"
    out = tables.render(tmp_path)
    assert "**A title** — NVIDIA H100 80GB HBM3, torch 2.13.0, commit `abc1234`, measured 2026-01-02" in out
    assert "| a | 1,200 | 0.25 |" in out and "| b | 3 | -1.5 |" in out and "a note" in out
    with pytest.raises(ValueError, match="3 cells"):
        tables.write_table("bad", "t", ["a", "b", "c"], [["only", 1]], "cmd", out=tmp_path)


def test_demo_results_file_renders_as_a_table(tmp_path):
    import json

    row = dict(label="AdamQ3R", technique="adamq3r", test_acc=0.9244, params=69066, eff_rank_min=9,
               eff_rank_max=12, mean_stable_rank=2.101, truncated_acc=0.6756, truncated_params=10698)
    demo = dict(kind="demo", model="vit", data="digits", epochs=20, batch_size=64, seed=0, threads=1,
                target_rank=4, machine="CPU X", torch="2.13.0", commit="abc", timestamp="2026-01-02T00:00:00Z",
                wall_s=30.2, rows=[row])
    (tmp_path / "demo-cpu-x.json").write_text(json.dumps(demo))
    out = tables.render(tmp_path)
    assert "| AdamQ3R | 0.924 | 69,066 | 9–12 | 2.10 | 0.676 |" in out
    assert "acc after truncating to rank 4" in out and "30 s wall" in out


def test_merge_keeps_newest_row_per_key(tmp_path):
    path = tmp_path / "dev.csv"
    common.append_rows(path, _rows({"torch": 2.0, "triton": 1.0}) + _rows({"torch": 9.0}, x=64))
    newer = dict(INFO, timestamp="2026-02-01T00:00:00Z")
    common.append_rows(path, _rows({"triton": 0.5}, info=newer) + _rows({"triton": 0.5}, config={"r": 8}))
    rows = common.read_rows(path)
    with open(path, newline="") as f:
        assert tuple(next(csv.reader(f))) == common.SCHEMA
    assert len(rows) == 4  # triton@4096 replaced, config r=8 is a different key
    triton = [r for r in rows if r["provider"] == "triton" and r["config"] == "" and r["x_value"] == "4096"]
    assert len(triton) == 1 and float(triton[0]["p50"]) == 0.5 and triton[0]["timestamp"] == newer["timestamp"]
    assert [r["x_value"] for r in rows if r["provider"] == "torch"] == ["64", "4096"]  # numeric order, not text
    assert {r["config"] for r in rows} == {"", "r=8"}


def test_make_row_and_stamp_format():
    row = common.make_row("k", "triton", "forward", "time", "ms", "shape", (4, 96), 1.25,
                          config={"r": 8, "dtype": "fp16"})
    assert row["config"] == "dtype=fp16;r=8" and row["p20"] is None
    stamped = common.stamp_rows([row], INFO)[0]
    assert tuple(stamped) == common.SCHEMA
    assert stamped["x_value"] == "4x96" and stamped["p50"] == "1.25" and stamped["p80"] == ""
    assert stamped["device"] == DEVICE and stamped["commit"] == "abc1234"
    with pytest.raises(ValueError, match="p50"):
        common.stamp_rows([{"kernel": "k", "provider": "p", "mode": "m", "metric": "time"}], INFO)


@pytest.mark.parametrize("name, gbs", [
    ("NVIDIA H100 80GB HBM3", 3350.0), ("NVIDIA H100 PCIe", 2000.0), ("NVIDIA H200", 4800.0),
    ("NVIDIA A100-SXM4-80GB", 2039.0), ("NVIDIA A100-SXM4-40GB", 1555.0), ("Some Future GPU", None),
])
def test_hbm_peak_by_name(monkeypatch, name, gbs):
    monkeypatch.setattr(common, "_is_cuda", lambda device: True)
    monkeypatch.setattr(common, "device_name", lambda device=None: name)
    assert common.hbm_peak_gbs("cuda") == gbs


def test_bandwidth_rows(monkeypatch):
    rows = common.bandwidth_rows("k", "triton", "forward", "n", 8, nbytes=2 * 10**9, p50=1000.0, p20=800.0,
                                 p80=1250.0, device="cpu")
    assert [(r["metric"], r["unit"], r["p50"], r["p20"], r["p80"]) for r in rows] == [
        ("bandwidth", "GB/s", 2.0, 1.6, 2.5)]
    monkeypatch.setattr(common, "hbm_peak_gbs", lambda device=None: 4.0)
    pct = common.bandwidth_rows("k", "triton", "forward", "n", 8, 2 * 10**9, 1000.0, device="cuda")[1]
    assert pct["metric"] == "hbm_pct" and pct["p50"] == 50.0 and pct["p20"] is None


def test_cpu_has_no_hbm_or_peak_memory():
    assert common.hbm_peak_gbs("cpu") is None
    assert common.peak_memory_mb(lambda: None, "cpu") is None
    assert common.device_slug("cpu").startswith("cpu")


def test_report_table_from_synthetic_csv(tmp_path):
    rows = (_rows({"torch": 4.0, "triton": 1.0, "torch_compile": 2.0, "peft": 5.0, "triton+variant": 8.0})
            + _rows({"torch": 0.4, "triton": 0.2}, x=512)
            + _rows({"torch": 300.0, "triton": 100.0}, metric="memory", unit="MB")
            + _rows({"torch": 1.0, "peft": 2.0}, mode="backward")  # none of ours: not in the table
            + _rows({"ours": 2.0, "torch_svd": 0.05}, x=64, mode="full"))  # our PyTorch algorithm, no torch row
    common.append_rows(tmp_path / "nvidia-h100.csv", rows)
    block = report.render(tmp_path)
    assert f"**{DEVICE}**" in block and "commit `abc1234`" in block
    table_rows = [line for line in block.splitlines() if line.startswith("| lora_matmul")]
    assert table_rows == [
        "| lora_matmul | forward | M=4096 | triton | 1 | 4 | 4.00x | 2.00x | peft 5.00x | 3.00x | – | – |",
        "| lora_matmul | forward | M=4096 | triton+variant | 8 | 4 | 0.50x | 0.25x | peft 0.62x | – | – | – |",
        "| lora_matmul | full | M=64 | ours | 2 | – | – | – | torch_svd 0.025x | – | – | – |"]

    readme = tmp_path / "README.md"
    readme.write_text(f"# t\n\n## Performance\n\n{report.START}\nold numbers\n{report.END}\n\ntail\n"
                      f"{tables.START}\n{tables.END}\n")
    args = ["--results", str(tmp_path), "--readme", str(readme)]
    assert report.main([*args, "--check"]) == 1
    assert report.main(args) == 0
    assert report.main([*args, "--check"]) == 0
    text = readme.read_text()
    assert "old numbers" not in text and f"{report.END}\n\ntail\n" in text and "4.00x" in text


def test_report_shows_launches_and_syncs(tmp_path):
    """Counts come from the ``launches`` / ``syncs`` rows (0 is shown, not taken for a missing value); ours / torch."""
    rows = (_rows({"torch": 4.0, "composed": 2.0, "peft": 5.0})
            + _rows({"torch": 5.0, "composed": 3.0, "peft": 5.0}, metric="launches", unit="count")
            + _rows({"torch": 0.0, "composed": 0.0}, metric="syncs", unit="count")
            + _rows({"torch": 4.0, "triton": 1.0}, mode="full")
            + _rows({"triton": 8.4}, mode="full", metric="launches", unit="count"))
    common.append_rows(tmp_path / "nvidia-h100.csv", rows)
    lines = [line for line in report.render(tmp_path).splitlines() if line.startswith("| lora_matmul")]
    assert lines == [
        "| lora_matmul | forward | M=4096 | composed | 2 | 4 | 2.00x | – | peft 2.50x | – | 3 / 5 | 0 / 0 |",
        "| lora_matmul | full | M=4096 | triton | 1 | 4 | 4.00x | – | – | – | 8.4 | – |"]


def test_backend_table_from_results(tmp_path):
    """--backend-table: per (op, cuda, dtype, shape class) the faster of composed and triton in mode full;
    CPU files and shapes where only one was timed are ignored."""
    cfg = {"M": 8192, "in": 4096, "out": 4096, "dtype": "bfloat16"}

    def rows(times, r, config=cfg, kernel="lora_matmul", mode="full", info=INFO):
        return common.stamp_rows([common.make_row(kernel, p, mode, "time", "ms", "r", r, t, config=config)
                                  for p, t in times.items()], info)

    small = dict(cfg, M=64)
    common.append_rows(tmp_path / "nvidia-h100.csv",
                       rows({"composed": 2.0, "triton": 1.5}, 16) + rows({"composed": 2.0, "triton": 2.5}, 64)
                       + rows({"composed": 1.0}, 128) + rows({"composed": 0.1, "triton": 0.2}, 16, small)
                       + rows({"composed": 3.0, "triton": 1.0}, 16, mode="forward")
                       + rows({"composed": 2.0, "triton": 1.0}, 32, kernel="lowrank_matmul"))
    common.append_rows(tmp_path / "cpu-test.csv", rows({"composed": 1.0, "triton": 9.0}, 16, small,
                                                      info=dict(INFO, device="CPU Test")))
    table = report.backend_table(tmp_path)
    assert table == {
        "lora_matmul/cuda/bfloat16/large-r16": "triton",
        "lora_matmul/cuda/bfloat16/large-r64": "composed",
        "lora_matmul/cuda/bfloat16/small-r16": "composed",
        "lowrank_matmul/cuda/bfloat16/large-r32": "triton",
    }
    backend_py = tmp_path / "backend.py"
    backend_py.write_text(f"x = 1\n{report.TABLE_START}\nTABLE: dict[str, str] = {{}}\n{report.TABLE_END}\ny = 2\n")
    assert report.main(["--results", str(tmp_path), "--readme", str(_readme(tmp_path)),
                        "--backend-table", str(backend_py)]) == 0
    namespace: dict = {}
    exec(backend_py.read_text(), namespace)
    assert namespace["TABLE"] == table and namespace["y"] == 2
    from lowrank_kernels import backend

    backend._check_table(namespace["TABLE"])  # what backend.py accepts at import


def test_committed_backend_table_is_valid_and_matches_results():
    from lowrank_kernels import backend

    backend._check_table(backend.TABLE)
    assert backend.TABLE == report.backend_table(ROOT / "bench" / "results"), (
        "backend.TABLE is stale: run `python -m bench.report --backend-table`")


def _readme(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# t\n{report.START}\n{report.END}\n{tables.START}\n{tables.END}\n")
    return readme


def test_merge_into_splits_by_device(tmp_path):
    run = tmp_path / "gpu_run.csv"
    cpu_info = dict(INFO, device="CPU Test Model")
    common.write_rows(run, _rows({"torch": 4.0, "triton": 1.0}) + _rows({"torch": 2.0, "triton": 3.0}, info=cpu_info))
    results = tmp_path / "results"
    written = report.merge_into(results, [run])
    assert sorted(p.name for p in written) == ["cpu-test-model.csv", "nvidia-h100-80gb-hbm3.csv"]
    assert report.merge_into(results, [run]) == written and len(common.read_rows(written[1])) == 2
    block = report.render(results)
    assert block.index(DEVICE) < block.index("CPU Test Model") and "0.67x" in block


def test_report_without_results_says_so(tmp_path):
    assert report.EMPTY in report.render(tmp_path)
    with pytest.raises(ValueError, match="markers"):
        report.replace_block("no markers here", "x")


def test_plot_writes_one_png_per_group(tmp_path):
    pytest.importorskip("matplotlib")
    from bench import plot

    path = tmp_path / "dev.csv"
    common.append_rows(path, _rows({"torch": 4.0, "triton": 1.0}) + _rows({"torch": 1.0, "triton": 0.5}, x=512)
                       + _rows({"torch": 3.0, "triton": 1.0}, mode="backward"))
    pngs = plot.plot_files([path], tmp_path / "plots")
    assert sorted(p.name for p in pngs) == ["lora_matmul_time_backward.png", "lora_matmul_time_forward.png"]
    assert all(p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    assert plot.speedup("time", 4.0, 1.0) == 4.0 and plot.speedup("bandwidth", 100.0, 300.0) == 3.0
