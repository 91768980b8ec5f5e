"""The ``lowrank-kernels`` command line: bad input, every technique for a few steps, sweeps, bench delegation."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import pytest

from lowrank_kernels.app.cli import main
from lowrank_kernels.app.techniques import ADAPTERS, DESCRIPTIONS, TECHNIQUES, availability

# a tiny model on synthetic data: every run below takes well under a second of training
TINY = ["--data", "synthetic", "--dim", "16", "--heads", "2", "--depth", "1", "--batch-size", "16", "--rank", "4",
        "--min-rank", "2", "--target-rank", "2", "--interval", "2", "--rank-every", "2", "--tensor-ranks", "2_2_2_2_2",
        "--threads", "1", "--no-progress", "--no-plots"]


def _run(capsys, argv):
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.parametrize("argv, needle", [
    (["train", "--model", "gpt-tiny", "--data", "/no/such/file.txt"], "not found"),
    (["train", "--technique", "controller", "--rank", "500"], "rank=500 is larger than layer"),
    (["train", "--technique", "lora", "--rank", "65"], "rank=65 is larger than layer"),
    (["train", "--technique", "adamq3r", "--target-rank", "100"], "target_rank=100 is larger than layer"),
    (["train", "--technique", "magic"], "unknown technique 'magic'"),
    (["train", "--lr", "abc"], "invalid float value: 'abc'"),
    (["train", "--epochs", "1.5"], "invalid int value"),
    (["train", "--target-rank", "most"], "invalid rank value"),
    (["train", "--config", "/no/such/config.yaml"], "config file '/no/such/config.yaml' not found"),
    (["train", "--lr", "-1"], "lr must be > 0"),
    (["train", "--resume", "--out", "/no/such/run"], "no checkpoint"),
    (["fly"], "invalid choice: 'fly'"),
    (["sweep", "/no/such/grid.yaml"], "not found"),
])
def test_bad_input_one_line_nonzero_exit(capsys, argv, needle):
    rc, out, err = _run(capsys, argv)
    assert rc == 2
    assert err.count("\n") == 1, err  # exactly one line
    assert needle in err
    assert "Traceback" not in err and out == ""


def test_unavailable_technique_is_one_line(capsys, tmp_path, monkeypatch):
    from lowrank_kernels.app import techniques as T

    monkeypatch.setitem(T._NEEDS, "tenslora", [("lowrank_kernels.adapters.not_there", "apply")])
    rc, _, err = _run(capsys, ["train", "--technique", "tenslora", "--out", str(tmp_path), *TINY])
    assert rc == 2 and err.count("\n") == 1
    assert "technique 'tenslora' is unavailable: lowrank_kernels.adapters.not_there.apply is missing" in err
    assert "UNAVAILABLE" in _run(capsys, ["techniques"])[1]


def test_resume_from_the_command_line(capsys, tmp_path):
    rc, out, err = _run(capsys, ["train", "--steps", "6", "--stop-after", "2", "--out", str(tmp_path), *TINY])
    assert rc == 0 and "continue with --resume" in out, err
    rc, out, err = _run(capsys, ["train", "--resume", "--out", str(tmp_path)])  # the run's own config.json
    assert rc == 0, err
    assert json.loads((tmp_path / "final.json").read_text())["steps"] == 6


def test_bad_config_value_in_file(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: fast\nepochs: 1\n")
    rc, _, err = _run(capsys, ["train", "--config", str(cfg)])
    assert rc == 2 and "'lr' must be a number, got 'fast'" in err and err.count("\n") == 1
    cfg.write_text("learning_rate: 0.1\n")
    rc, _, err = _run(capsys, ["train", "--config", str(cfg)])
    assert rc == 2 and "unknown config key 'learning_rate'" in err


def test_bad_input_real_process():
    # as a user sees it: a real process, its exit status and its stderr
    p = subprocess.run([sys.executable, "-m", "lowrank_kernels.app", "train", "--lr", "abc"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("lowrank-kernels"), p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("technique", TECHNIQUES)
def test_train_each_technique_few_steps(capsys, tmp_path, technique):
    if availability()[technique] is not None:  # a missing building block must be reported, one line
        rc, _, err = _run(capsys, ["train", "--technique", technique, "--steps", "3", "--out", str(tmp_path), *TINY])
        assert rc == 2 and "is unavailable" in err and err.count("\n") == 1
        return
    rc, out, err = _run(capsys, ["train", "--technique", technique, "--steps", "4", "--out", str(tmp_path), *TINY])
    assert rc == 0, err
    assert f"{technique}: test acc" in out
    steps = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in steps if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert any("ranks" in r for r in steps) and any("eval" in r for r in steps)
    final = json.loads((tmp_path / "final.json").read_text())
    assert final["technique"] == technique and final["steps"] == 4 and 0.0 <= final["test_acc"] <= 1.0
    assert (tmp_path / "checkpoint.pt").is_file() and (tmp_path / "final_model.pt").is_file()
    if technique in ("q3r", "lorita-q3r"):
        assert all("reg" in r for r in steps if "loss" in r)
    # truncating to the target rank never needs more storage than the trained model itself
    assert final["truncated_params"] <= final["params"], (final["truncated_params"], final["params"])
    assert 0 < final["params_trainable_frac"] <= 1 and final["params_trainable"] > 0
    assert f"trainable {final['params_trainable']:,} = " in out
    assert ".png" not in out  # --no-plots: no plot is announced
    assert f"{tmp_path}/final.json" in out and f"{tmp_path}/checkpoint.pt" in out
    if technique == "controller":
        assert final["params"] < 2762  # factored layers: fewer parameters than the dense tiny model
        factor = [r["factor_ranks"] for r in steps if "factor_ranks" in r]
        assert factor and factor[-1] == final["controller_ranks"]
    if technique == "lorita-q3r":
        assert final["params"] == 2762  # composed back into plain Linear layers for inference


@pytest.mark.gpu
@pytest.mark.parametrize("technique", TECHNIQUES)
def test_train_each_technique_on_cuda(capsys, tmp_path, technique):
    rc, _, err = _run(capsys, ["train", "--technique", technique, "--steps", "4", "--device", "cuda",
                               "--out", str(tmp_path), *TINY])
    assert rc == 0, err
    assert json.loads((tmp_path / "final.json").read_text())["steps"] == 4


def test_train_text_file_lm_with_plots_and_config(capsys, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: gpt-tiny\ndata: {text}\nseq_len: 16\nsteps: 4\nbatch_size: 8\ndim: 16\nheads: 2\n"
                   f"depth: 1\ntechnique: adamq3r\nlmbda: 0.5\ntarget_rank: 2\nrank_every: 2\n")
    for tok in ("char", "word"):
        out_dir = tmp_path / tok
        rc, out, err = _run(capsys, ["train", "--config", str(cfg), "--tokenizer", tok, "--out", str(out_dir),
                                     "--threads", "1", "--no-progress", "--plots" if tok == "char" else "--no-plots"])
        assert rc == 0, err
        final = json.loads((out_dir / "final.json").read_text())
        assert final["test_ppl"] > 1.0 and "ppl" in out
    for png in ("loss.png", "ranks.png", "spectra.png"):
        assert (tmp_path / "char" / png).stat().st_size > 1000
        assert str(tmp_path / "char" / png) in out or tok == "word"


def test_init_from_a_finished_run(capsys, tmp_path):
    rc, _, err = _run(capsys, ["train", "--steps", "3", "--out", str(tmp_path / "base"), *TINY])
    assert rc == 0, err
    rc, _, err = _run(capsys, ["train", "--technique", "lora", "--steps", "3", "--init-from", str(tmp_path / "base"),
                               "--out", str(tmp_path / "lora"), *TINY])
    assert rc == 0, err
    rc, _, err = _run(capsys, ["train", "--init-from", str(tmp_path / "nothing"), "--out", str(tmp_path / "x"), *TINY])
    assert rc == 2 and "init_from" in err


def test_sweep_skips_finished_runs_on_restart(capsys, tmp_path):
    grid = tmp_path / "grid.yaml"
    out = tmp_path / "sweep"
    grid.write_text(f"out: {out}\nworkers: 0\nbase: {{data: synthetic, dim: 16, heads: 2, depth: 1, batch_size: 16, "
                    f"steps: 3, plots: false, progress: false, rank_every: 0, threads: 1}}\n"
                    f"grid:\n  technique: [adamw, adamq3r]\n")
    assert main(["sweep", str(grid)]) == 0
    first = capsys.readouterr().out
    assert "2 runs, 0 already finished, 2 to run" in first
    finals = sorted(out.glob("*/final.json"))
    assert len(finals) == 2
    stamps = [f.stat().st_mtime_ns for f in finals]
    # one run interrupted (final.json gone, checkpoint kept) and one grid point added
    (out / "technique=adamw" / "final.json").unlink()
    grid.write_text(grid.read_text().replace("[adamw, adamq3r]", "[adamw, adamq3r, q3r]"))
    assert main(["sweep", str(grid)]) == 0
    second = capsys.readouterr().out
    assert "3 runs, 1 already finished, 2 to run" in second
    # a progress line per finished job: i/N, the run, its result and the time
    progress = [line for line in second.splitlines() if line.strip().startswith("[")]
    assert [line.split()[0] for line in progress] == ["[1/2]", "[2/2]"], second
    assert {line.split()[1] for line in progress} == {"technique=adamw:", "technique=q3r:"}
    assert all("test acc 0." in line and " s, elapsed " in line for line in progress), progress
    assert (out / "technique=adamq3r" / "final.json").stat().st_mtime_ns == stamps[0]
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["technique"] for r in rows] == ["adamw", "adamq3r", "q3r"]
    assert all(r["status"] == "done" and 0.0 <= float(r["test_acc"]) <= 1.0 for r in rows)


def test_sweep_reports_failed_run(capsys, tmp_path):
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"out": str(tmp_path / "s"), "workers": 0, "grid": {"technique": ["nope"]}}))
    rc, _, err = _run(capsys, ["sweep", str(grid)])
    assert rc == 2 and "run technique=nope: unknown technique 'nope'" in err


def test_bench_outside_repo_is_a_clear_error(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = _run(capsys, ["bench", "--quick"])
    assert rc == 2 and "repository root" in err and err.count("\n") == 1


def test_bench_delegates_to_the_repo_runner(tmp_path, monkeypatch):
    calls = []
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "__main__.py").write_text("")
    monkeypatch.setattr(subprocess, "call", lambda cmd, cwd: calls.append((cmd, cwd)) or 0)
    assert main(["bench", "--quick", "bench_q3r"]) == 0
    assert calls == [([sys.executable, "-m", "bench", "--quick", "bench_q3r"], tmp_path)]


def test_techniques_listing(capsys):
    rc, out, _ = _run(capsys, ["techniques"])
    assert rc == 0
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == list(TECHNIQUES)  # one line each
    for t, line in zip(TECHNIQUES, lines, strict=True):
        assert DESCRIPTIONS[t] in line and len(DESCRIPTIONS[t]) > 30
        assert ("UNAVAILABLE" in line) == (availability()[t] is not None)


def test_technique_defaults_apply_only_where_not_given():
    from lowrank_kernels.app.config import TrainConfig, from_dict

    assert from_dict({"technique": "q3r"}).lmbda == 1e-3  # its own default
    assert from_dict({"technique": "q3r", "lmbda": 0.5}).lmbda == 0.5  # the user's value wins
    assert from_dict({"technique": "adamq3r"}).lmbda == TrainConfig.lmbda
    assert from_dict({"technique": "lora"}).lr != TrainConfig.lr


def test_plots_colours_and_labels(tmp_path, monkeypatch):
    """ranks.png: a distinct (colour, style) per line, the controller's factor ranks labelled as such;
    spectra.png: axis labels."""
    from lowrank_kernels.app import report

    for n in (12, 24):
        styles = report.line_styles(n)
        assert len(set(styles)) == n
    figs = {}
    save = report._save

    def capture(fig, out, name):
        figs[name] = [(a.get_xlabel(), a.get_ylabel(), [(str(ln.get_color()), ln.get_linestyle())
                                                         for ln in a.get_lines()]) for a in fig.axes]
        return save(fig, out, name)

    monkeypatch.setattr(report, "_save", capture)
    labels = [f"blocks.{b}.{m}" for b in range(2) for m in ("q", "k", "v", "proj", "fc1", "fc2")]
    recs = [{"step": s, "loss": 1.0, "ranks": {k: 60 for k in labels}, "factor_ranks": {k: 16 - s for k in labels}}
            for s in range(3)]
    sv = {k: [3.0, 2.0, 1.0] for k in labels}
    report.write_plots(tmp_path, recs, sv, sv, "t", "controller")
    [(_, ylabel, lines)] = figs["ranks.png"]
    assert "factor rank" in ylabel and len(lines) == 12 and len(set(lines)) == 12
    assert all(x == "index i" and "singular value" in y for x, y, _ in figs["spectra.png"][:12])
    figs.clear()
    report.write_plots(tmp_path, [{k: v for k, v in r.items() if k != "factor_ranks"} for r in recs], sv, sv, "t",
                       "q3r")
    assert "rank@1%" in figs["ranks.png"][0][1]


@pytest.fixture(scope="module")
def base_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("adapter-bases")


@pytest.mark.parametrize("technique", TECHNIQUES)
def test_every_technique_learns_digits_at_its_defaults(capsys, tmp_path, base_cache, technique):
    """``train --technique T --epochs 3`` with nothing else set (run control aside) reaches test accuracy >= 0.5
    on digits; adapters fine-tune a base pretrained on digits 0-4 (one per test module) to digits 5-9."""
    if availability()[technique] is not None:
        pytest.skip(f"{technique} is not part of this build: {availability()[technique]}")
    rc, out, err = _run(capsys, ["train", "--technique", technique, "--epochs", "3", "--threads", "1",
                                 "--no-progress", "--no-plots", "--cache-dir", str(base_cache), "--out", str(tmp_path)])
    assert rc == 0, err
    final = json.loads((tmp_path / "final.json").read_text())
    assert final["test_acc"] >= 0.5, (technique, final["test_acc"])
    if technique in ADAPTERS:
        base = final["adapter_base"]
        assert "classes 0-4" in base["pretrained_on"] and "classes 5-9" in base["adapted_to"]
        assert base["pretrain_acc"] > 0.8
        assert final["params_trainable_frac"] < 0.5 and "trainable" in out and "adapter base" in out
