"""Checkpoint safety (lowrank_kernels.app.checkpoint): nothing but data is unpickled, corruption is refused
naming the file, an incomplete checkpoint gives a clear error, writes are atomic."""

from __future__ import annotations

import io
import os
import pickle
import shutil

import pytest
import torch

from lowrank_kernels.app import checkpoint as ck
from lowrank_kernels.app.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from lowrank_kernels.app.train import from_dict, run

TINY = dict(data="synthetic", dim=16, heads=2, depth=1, batch_size=16, target_rank=2, q3r_steps=4, rank_every=0,
            threads=1, progress=False, plots=False, technique="adamq3r", steps=4)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A real run stopped after 2 of 4 steps: its folder holds a resumable checkpoint.pt."""
    out = tmp_path_factory.mktemp("stopped")
    assert run(from_dict({**TINY, "out": str(out), "stop_after": 2})) == {"stopped_at": 2}
    return out


def _copy(stopped_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(stopped_run, dst)
    return dst


def _resume(out):
    return run(from_dict({**TINY, "out": str(out), "resume": True}))


class _RunsCode:
    """Unpickling this calls ``os.system`` (a shell command that creates a marker file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_round_trip_keeps_tensors_and_primitives(tmp_path):
    obj = {"t": torch.randn(3, 4), "nested": {"l": [1, 2.5, None, True, "s"], "tu": (1, (2, 3))},
           "bf16": torch.randn(5).bfloat16(), "step": 7}
    save_checkpoint(obj, tmp_path / "c.pt")
    back = load_checkpoint(tmp_path / "c.pt", required=())
    assert torch.equal(back["t"], obj["t"]) and torch.equal(back["bf16"], obj["bf16"])
    assert back["nested"] == obj["nested"] and back["step"] == 7
    assert not (tmp_path / "c.pt.tmp").exists()


def test_rng_state_round_trips_and_needs_no_pickled_numpy(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in NumPy's state
    save_checkpoint({"rng": ck.rng_state()}, tmp_path / "r.pt")
    want = (torch.rand(4), random.random(), np.random.standard_normal(3))
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    ck.set_rng_state(load_checkpoint(tmp_path / "r.pt", required=("rng",))["rng"])
    got = (torch.rand(4), random.random(), np.random.standard_normal(3))
    assert torch.equal(want[0], got[0]) and want[1] == got[1] and (want[2] == got[2]).all()


@pytest.mark.parametrize("with_header", [False, True])
def test_crafted_pickle_is_refused_and_never_runs(stopped_run, tmp_path, with_header):
    """A pickle whose loading would run a shell command: ``--resume`` refuses it and the command never runs.

    Without our header the file is refused before any unpickling; with a valid header and digest (an
    attacker who knows the format) ``weights_only=True`` refuses the ``os.system`` global.
    """
    out = _copy(stopped_run, tmp_path)
    marker = tmp_path / "pwned"
    evil = {"config": {}, "rng": _RunsCode(marker)}
    if with_header:
        buf = io.BytesIO()
        torch.save(evil, buf)
        payload = buf.getvalue()
        import hashlib

        data = ck.MAGIC + f"sha256 {hashlib.sha256(payload).hexdigest()} {len(payload)}\n".encode() + payload
    else:
        data = pickle.dumps(evil)
    (out / "checkpoint.pt").write_bytes(data)
    with pytest.raises(CheckpointError, match="checkpoint.pt") as info:
        _resume(out)
    assert ("other than tensors" if with_header else "not a lowrank-kernels checkpoint") in str(info.value)
    assert not marker.exists(), "the crafted checkpoint ran code"
    # the payload really is armed: unpickling it without weights_only runs the command
    if with_header:
        torch.load(io.BytesIO(payload), weights_only=False)
    else:
        pickle.loads(data)
    assert marker.exists()


def test_plain_torch_save_file_is_refused(tmp_path):
    torch.save({"step": 1}, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="old.pt.*not a lowrank-kernels checkpoint"):
        load_checkpoint(tmp_path / "old.pt")


def _corrupt_positions(size: int, header: int) -> list[int]:
    step = max(1, (size - header) // 23)
    return sorted({0, 10, len(ck.MAGIC) + 3, len(ck.MAGIC) + 20, header + 1, *range(header + 2, size - 4, step),
                   size - 4})


def test_zeroed_word_anywhere_is_refused_naming_the_file(stopped_run, tmp_path):
    """Four zeroed bytes in the header, the digest or anywhere in the payload: refused, the file named."""
    out = _copy(stopped_run, tmp_path)
    path = out / "checkpoint.pt"
    good = path.read_bytes()
    header = good.index(b"\n", len(ck.MAGIC)) + 1
    tried = 0
    for pos in _corrupt_positions(len(good), header):
        if good[pos:pos + 4] == b"\0\0\0\0":
            continue
        path.write_bytes(good[:pos] + b"\0\0\0\0" + good[pos + 4:])
        with pytest.raises(CheckpointError, match=r"checkpoint\.pt") as info:
            load_checkpoint(path)
        assert "corrupted" in str(info.value) or "header" in str(info.value), (pos, str(info.value))
        tried += 1
    assert tried >= 20
    path.write_bytes(good[:-10])
    with pytest.raises(CheckpointError, match="checkpoint.pt.*truncated"):
        load_checkpoint(path)
    pos = next(p for p in range(header + 100, len(good)) if good[p:p + 4] != b"\0\0\0\0")
    path.write_bytes(good[:pos] + b"\0\0\0\0" + good[pos + 4:])
    with pytest.raises(ValueError, match="checkpoint.pt.*corrupted"):  # and --resume refuses it the same way
        _resume(out)


def _rewrite(path, edit):
    obj = load_checkpoint(path)
    edit(obj)
    save_checkpoint(obj, path)


@pytest.mark.parametrize("edit, match", [
    (lambda o: o.pop("rng"), "lacks 'rng'"),
    (lambda o: o.pop("optimizer"), "lacks 'optimizer'"),
    (lambda o: o["rng"].pop("numpy"), "'rng' lacks the numpy state"),
    (lambda o: o["model"].pop(next(iter(o["model"]))), "its model state does not fit"),
    (lambda o: o["optimizer"].pop("state"), "its optimizer state does not fit"),
    (lambda o: o["rng"].update(torch=torch.zeros(3)), "its rng state does not fit"),
])
def test_incomplete_checkpoint_gives_a_clear_error(stopped_run, tmp_path, edit, match):
    out = _copy(stopped_run, tmp_path)
    _rewrite(out / "checkpoint.pt", edit)
    with pytest.raises(CheckpointError, match=match) as info:
        _resume(out)
    assert "checkpoint.pt" in str(info.value)


def test_resume_from_a_verified_checkpoint_finishes(stopped_run, tmp_path):
    out = _copy(stopped_run, tmp_path)
    res = _resume(out)
    assert res["steps"] == 4 and load_checkpoint(out / "checkpoint.pt")["step"] == 4


def test_write_is_atomic_and_synced(tmp_path, monkeypatch):
    """The new bytes are fsync-ed in a temporary file before ``os.replace``: a failure before the rename
    (a kill, a full disk) leaves the previous checkpoint whole."""
    path = tmp_path / "c.pt"
    save_checkpoint({"v": torch.ones(3)}, path)
    before = path.read_bytes()
    calls = []
    real_fsync = os.fsync
    monkeypatch.setattr(ck.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd)))

    def failing_replace(src, dst):
        calls.append("replace")
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(ck.os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint({"v": torch.zeros(3)}, path)
    assert calls == ["fsync", "replace"]
    assert path.read_bytes() == before
    assert torch.equal(load_checkpoint(path, required=())["v"], torch.ones(3))
    monkeypatch.undo()
    save_checkpoint({"v": torch.zeros(3)}, path)
    assert torch.equal(load_checkpoint(path, required=())["v"], torch.zeros(3))
