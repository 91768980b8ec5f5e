"""Checkpoint / resume: an interrupted run, resumed, ends with the parameters of the uninterrupted run (CPU).

The checkpoint carries the model, the optimizer (AdamQ3R's Q3R operators included), the LR schedule, the
Q3R regulariser or rank-controller state and every RNG state; the batch order depends on (seed, epoch) only.
The checkpoints are read back here through ``load_checkpoint`` (digest checked, ``weights_only``), as ``--resume``
reads them.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from lowrank_kernels.app.checkpoint import load_checkpoint
from lowrank_kernels.app.techniques import TECHNIQUES
from lowrank_kernels.app.train import from_dict, run

TINY = dict(data="synthetic", dim=16, heads=2, depth=1, batch_size=16, rank=6, min_rank=2, target_rank=2,
            interval=3, q3r_steps=4, rank_every=3, tensor_ranks="2_2_2_2_2", threads=1, progress=False, plots=False)


def _cfg(out, **kw):
    return from_dict({**TINY, **kw, "out": str(out)})


def _final_state(out) -> dict:
    return load_checkpoint(out / "checkpoint.pt")


def _losses(out) -> list[float]:
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if "loss" in r]


def _assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), f"{k}: max diff {(a[k] - b[k]).abs().max().item()}"


@pytest.mark.parametrize("technique", TECHNIQUES)
def test_stop_and_resume_equals_uninterrupted(tmp_path, technique):
    steps = 13  # Q3R refreshes at steps 1, 5, 9, 13 and the controller decides every 3: both straddle the stop
    kw = dict(technique=technique, steps=steps)
    if technique == "controller":  # no smoothing, no safety margin: resizes within these few steps
        kw.update(ema_decay=0.0, safety_factor=1.0)
    full = run(_cfg(tmp_path / "full", **kw))
    part = run(_cfg(tmp_path / "part", **kw, stop_after=6))
    assert part == {"stopped_at": 6}
    assert not (tmp_path / "part" / "final.json").exists()
    resumed = run(_cfg(tmp_path / "part", **kw, resume=True))
    a, b = _final_state(tmp_path / "full"), _final_state(tmp_path / "part")
    _assert_same_params(a["model"], b["model"])
    assert _losses(tmp_path / "full") == _losses(tmp_path / "part")  # the log is continuous, no duplicate steps
    assert full["test_acc"] == resumed["test_acc"] and full["layers"] == resumed["layers"]
    if technique == "controller":
        assert a["technique"]["controller"] == b["technique"]["controller"]
        assert any(r.get("events") for r in map(json.loads, (tmp_path / "full" / "log.jsonl").read_text()
                                                 .splitlines())), "no resize happened: the test would prove little"
    if technique == "adamq3r":
        qa, qb = a["optimizer"]["q3r"], b["optimizer"]["q3r"]
        assert qa["t"] == qb["t"] == steps and [o["eps"] for o in qa["ops"]] == [o["eps"] for o in qb["ops"]]


def test_resume_refuses_a_different_config(tmp_path):
    run(_cfg(tmp_path, steps=6, stop_after=2))
    with pytest.raises(ValueError, match="differs from the checkpoint's in lr"):
        run(_cfg(tmp_path, steps=6, lr=0.1, resume=True))


def test_killed_process_resumes_to_identical_parameters(tmp_path):
    """SIGKILL a real training process mid-way, resume it, compare with an uninterrupted run at step 40."""
    killed, ref = tmp_path / "killed", tmp_path / "ref"
    common = dict(TINY, technique="adamq3r", steps=5000, ckpt_every=4)
    args = [f"--{k.replace('_', '-')}={v}" for k, v in common.items() if not isinstance(v, bool)]
    proc = subprocess.Popen([sys.executable, "-m", "lowrank_kernels.app", "train", *args, "--no-progress",
                             "--no-plots", f"--out={killed}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not (killed / "checkpoint.pt").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    at = load_checkpoint(killed / "checkpoint.pt")["step"]  # verified: the kill left a whole file
    assert 4 <= at < 40, f"killed at step {at}"
    run(from_dict({**common, "out": str(killed), "resume": True, "stop_after": 40}))
    run(from_dict({**common, "out": str(ref), "stop_after": 40}))
    a, b = _final_state(killed), _final_state(ref)
    assert a["step"] == b["step"] == 40
    _assert_same_params(a["model"], b["model"])
    assert _losses(killed) == _losses(ref)
