"""``lowrank-kernels train`` under ``torchrun --nproc-per-node 2`` on the CPU (gloo): DDP and FSDP2.

Each run is a real launch (``python -m torch.distributed.run --standalone``) of a 4-step training of a 1-block
ViT on digits (one epoch; the last global batch, 3 samples, is split unevenly). The processes train disjoint
halves of every global batch with the loss scaled so that the averaged gradient is the global batch's, so a DDP
or FSDP2 run must end at the parameters of the one-process run (fp32: the sums are only re-associated, 1e-5
absolute). A wrapper entry point records every write of ``final.json`` to
check that rank 0 alone writes it (once). The rank controller runs under DDP (resizes happen; the DDP wrapper is
rebuilt) and must match its one-process run; under FSDP2 it is refused as a one-line config error.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lowrank_kernels.app.cli import main

ROOT = Path(__file__).resolve().parents[1]
# 1347 digits in batches of 448: 4 steps, the last batch of 3 split 2 | 1 over the processes
SMALL = ["--epochs", "1", "--batch-size", "448", "--dim", "32", "--depth", "1", "--heads", "2", "--threads", "1",
         "--no-progress", "--no-plots"]
# the controller shrinks at once (target 0.3 x the stable rank, a decision every step)
CONTROLLER = ["--technique", "controller", "--rank", "16", "--interval", "1", "--safety-factor", "0.3",
              "--min-rank", "2", "--max-step", "4"]

WRAPPER = textwrap.dedent("""
    import os, pathlib, sys
    _write = pathlib.Path.write_text
    def _recording(self, *a, **k):
        if self.name == "final.json":
            with open(os.path.join(os.environ["FINAL_WRITES"], "writes.txt"), "a") as f:
                f.write(os.environ.get("RANK", "-") + "\\n")
        return _write(self, *a, **k)
    pathlib.Path.write_text = _recording
    from lowrank_kernels.app.cli import main
    sys.exit(main())
""")


def _env(tmp: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", FINAL_WRITES=str(tmp))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.pop("LOWRANK_KERNELS_DEBUG", None)
    env.pop("TRITON_INTERPRET", None)  # as a user's CPU run: the torch path, not the Triton interpreter
    return env


def _torchrun(tmp: Path, args: list[str]) -> subprocess.CompletedProcess:
    wrapper = tmp / "wrap_app.py"
    if not wrapper.is_file():
        wrapper.write_text(WRAPPER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(wrapper),
           "train", *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(tmp), capture_output=True, text=True, timeout=120)


def _single(args: list[str]) -> None:
    """The same run in this process (no torchrun): the reference."""
    assert main(["train", *args]) == 0


def _ok(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, res.stderr[-3000:]


def _params(out: Path) -> dict:
    return torch.load(out / "final_model.pt", weights_only=True)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape for k in a)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _written_once_by_rank0(tmp: Path, out: Path) -> None:
    writes = (tmp / "writes.txt").read_text().split()
    assert writes == ["0"], f"final.json written by ranks {writes}"
    (tmp / "writes.txt").unlink()
    assert (out / "final.json").is_file()
    import json

    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs if "lr" in r]
    assert steps == [1, 2, 3, 4], f"log.jsonl must hold each step once (rank 0 alone writes it), got {steps}"


@pytest.fixture(scope="module")
def single_adamq3r(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    _single(["--technique", "adamq3r", *SMALL, "--out", str(tmp / "run")])
    return _params(tmp / "run")


def test_adamq3r_ddp_equals_one_process(tmp_path, single_adamq3r):
    out = tmp_path / "ddp"
    res = _torchrun(tmp_path, ["--technique", "adamq3r", *SMALL, "--out", str(out)])  # auto -> ddp
    _ok(res)
    _written_once_by_rank0(tmp_path, out)
    assert res.stdout.count("adamq3r: test acc") == 1  # rank 0 alone reports
    assert _max_diff(_params(out), single_adamq3r) < 1e-5
    # each process saved its own optimizer state next to the whole-model checkpoint
    assert sorted(p.name for p in out.glob("checkpoint*.pt")) == [
        "checkpoint-step4.rank0.pt", "checkpoint-step4.rank1.pt", "checkpoint.pt"]


def test_adamq3r_fsdp2_equals_one_process_and_resumes(tmp_path, single_adamq3r):
    out = tmp_path / "fsdp2"
    args = ["--technique", "adamq3r", *SMALL, "--distributed", "fsdp2", "--out", str(out)]
    res = _torchrun(tmp_path, [*args, "--stop-after", "2"])
    _ok(res)
    assert not (out / "final.json").exists()
    assert sorted(p.name for p in out.glob("checkpoint*.pt")) == [
        "checkpoint-step2.rank0.pt", "checkpoint-step2.rank1.pt", "checkpoint.pt"]
    res = _torchrun(tmp_path, ["--resume", "--out", str(out), "--threads", "1", "--no-progress"])
    _ok(res)
    _written_once_by_rank0(tmp_path, out)
    # the files of step 2 were replaced by those of step 4
    assert sorted(p.name for p in out.glob("checkpoint*.pt")) == [
        "checkpoint-step4.rank0.pt", "checkpoint-step4.rank1.pt", "checkpoint.pt"]
    assert _max_diff(_params(out), single_adamq3r) < 1e-5


def test_resume_needs_the_checkpoints_mode_and_processes(tmp_path, capsys):
    # the one-process reference's checkpoint (distributed none, 1 process) cannot be resumed as a 2-process run
    # and vice versa: the batch split and the optimizer state depend on both
    out = tmp_path / "one"
    _single(["--technique", "adamq3r", *SMALL, "--out", str(out), "--stop-after", "2"])
    from lowrank_kernels.app import checkpoint

    blob = checkpoint.load_checkpoint(out / "checkpoint.pt")
    assert (blob["distributed"], blob["world_size"]) == ("none", 1)
    blob.update(distributed="ddp", world_size=2)
    checkpoint.save_checkpoint(blob, out / "checkpoint.pt")
    assert main(["train", "--resume", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "saved with distributed=ddp by 2 process(es), this launch is distributed=none with 1" in err


def test_controller_ddp_resizes_and_equals_one_process(tmp_path):
    out, one = tmp_path / "ctl", tmp_path / "one"
    _ok(_torchrun(tmp_path, [*CONTROLLER, *SMALL, "--distributed", "ddp", "--out", str(out)]))
    _written_once_by_rank0(tmp_path, out)
    events = [line for line in (out / "log.jsonl").read_text().splitlines() if '"events"' in line]
    assert events, "the controller resized nothing: the DDP rewrap after a resize was not exercised"
    _single([*CONTROLLER, *SMALL, "--out", str(one)])
    a, b = _params(out), _params(one)
    assert _max_diff(a, b) < 1e-4  # same ranks (shapes) and the same weights


def test_controller_fsdp2_is_a_config_error(tmp_path, capsys):
    msg = "technique 'controller' cannot run with distributed=fsdp2"
    assert main(["train", *CONTROLLER, "--distributed", "fsdp2", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1
    res = _torchrun(tmp_path, [*CONTROLLER, *SMALL, "--distributed", "fsdp2", "--out", str(tmp_path / "y")])
    assert res.returncode != 0  # torchrun's own status for a failed worker; each worker exits 2
    assert "exitcode  : 2" in res.stderr
    worker_lines = [ln for ln in res.stderr.splitlines() if msg in ln]
    assert worker_lines and all(ln.startswith("lowrank-kernels: error: ") for ln in worker_lines)
    assert not (tmp_path / "y" / "final.json").exists()


def test_distributed_option_is_validated(capsys):
    # ddp without torchrun, an unknown mode, a technique that does not run distributed
    assert main(["train", "--technique", "adamq3r", "--distributed", "ddp"]) == 2
    assert "needs several processes" in capsys.readouterr().err
    assert main(["train", "--distributed", "mpi"]) == 2
    assert "unknown distributed 'mpi'" in capsys.readouterr().err
    assert main(["train", "--technique", "lora", "--distributed", "ddp"]) == 2
    assert "technique 'lora' does not run with distributed=ddp" in capsys.readouterr().err
    from lowrank_kernels.app.config import resolve_distributed

    assert resolve_distributed("auto") == "none"  # no WORLD_SIZE here


def test_distributed_none_under_torchrun_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    from lowrank_kernels.app.config import resolve_distributed

    assert resolve_distributed("auto") == "ddp"
    assert main(["train", "--technique", "adamq3r", "--distributed", "none"]) == 2
    assert "distributed=none with 2 processes" in capsys.readouterr().err
