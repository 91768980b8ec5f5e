"""RankControllerCallback inside a real transformers.Trainer: state saved with each checkpoint and restored on
resume, so a resumed run equals the uninterrupted one (issue 16.4). Tiny local model, no downloads."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowrank_kernels.nn import LowRankLinear

pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONTROLLER = dict(min_rank=2, interval=2, safety_factor=2.5, ema_decay=0.5, grow_threshold=0.05)


class TinyRegressor(nn.Module):
    """Two LowRankLinear layers; ``forward(x, labels)`` returns the Trainer's ``{"loss", "logits"}``."""

    def __init__(self):
        super().__init__()
        self.up = LowRankLinear(12, 16, 4)
        self.down = LowRankLinear(16, 10, 3)

    def forward(self, x, labels=None):
        y = self.down(F.gelu(self.up(x)))
        return {"loss": F.mse_loss(y, labels), "logits": y}


def _data(n=64):
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(n, 12, generator=g), torch.randn(n, 10, generator=g)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def _trainer(out_dir, model, callback, restore_flag=False):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=16, per_device_train_batch_size=8, learning_rate=3e-2,
        weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0, save_strategy="steps", save_steps=8,
        logging_steps=1000, report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
        dataloader_num_workers=0, restore_callback_states_from_checkpoint=restore_flag,
    )
    return Trainer(model=model, args=args, train_dataset=_data(), callbacks=[callback])


def _callback_of(trainer):
    from lowrank_kernels.rank import RankControllerCallback

    found = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, RankControllerCallback)]
    assert len(found) == 1
    return found[0]


@pytest.mark.parametrize("restore_flag", [False, True])
def test_trainer_resume_equals_uninterrupted_run(tmp_path, restore_flag):
    from lowrank_kernels.rank import RankControllerCallback

    torch.manual_seed(0)
    full = _trainer(tmp_path / "full", TinyRegressor(), RankControllerCallback(**CONTROLLER))
    full.train()
    full_cb = _callback_of(full)
    ckpt = tmp_path / "full" / "checkpoint-8"
    saved = json.loads((ckpt / "rank_controller.json").read_text())
    assert saved["num_steps"] == 8
    assert saved["ranks"] != {"up": 4, "down": 3}, "no resize before the checkpoint: the resume would be vacuous"
    late = [e for e in full_cb.events if e.step > 8]
    assert late and any(e.new_rank > e.old_rank for e in late), "no grow after the checkpoint"

    torch.manual_seed(123)  # another initialisation: everything must come from the checkpoint
    resumed = _trainer(tmp_path / "resumed", TinyRegressor(), RankControllerCallback(**CONTROLLER), restore_flag)
    resumed.train(resume_from_checkpoint=str(ckpt))
    cb = _callback_of(resumed)
    assert cb.controller.num_steps == 16
    assert [e.to_dict() for e in cb.events] == [e.to_dict() for e in late]
    assert cb.controller.ranks == full_cb.controller.ranks
    assert cb.controller.ema == pytest.approx(full_cb.controller.ema, rel=1e-6)
    full_params = dict(full.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        assert p.shape == full_params[name].shape, name
        torch.testing.assert_close(p, full_params[name], atol=1e-4, rtol=0, msg=name)


def test_state_round_trips_through_exportable_state():
    """state() carries the controller's settings and state; a callback rebuilt from it (as the Trainer does
    with restore_callback_states_from_checkpoint) builds an equal controller and restores its counters."""
    from lowrank_kernels.rank import RankController, RankControllerCallback

    model = TinyRegressor()
    ctrl = RankController(model, None, **CONTROLLER)
    for _ in range(4):
        ctrl.step()
    cb = RankControllerCallback(ctrl)
    exported = json.loads(json.dumps(cb.state()))
    rebuilt = RankControllerCallback(**exported["args"])
    for key, value in exported["attributes"].items():
        setattr(rebuilt, key, value)
    args = type("Args", (), {"world_size": 1})()
    state = type("State", (), {"global_step": 4, "stateful_callbacks": {}})()
    rebuilt.on_train_begin(args, state, None, model=model, optimizer=None)
    assert rebuilt.controller.config() == ctrl.config()
    assert rebuilt.controller.state_dict() == ctrl.state_dict()
