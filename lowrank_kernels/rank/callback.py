"""``transformers.TrainerCallback`` that runs a :class:`RankController` inside ``Trainer``.

Importing this module imports ``transformers`` (an optional dependency); ``lowrank_kernels.rank`` only
imports it when ``RankControllerCallback`` is first accessed.
"""

from __future__ import annotations

import json
import os

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError("RankControllerCallback needs `transformers` (pip install transformers)") from exc

from .controller import RankController
from .resize import unwrap_optimizer


class RankControllerCallback(TrainerCallback, ExportableState):
    """Calls ``controller.step()`` after every optimizer step of a ``Trainer``.

    Pass a ready ``controller`` or the keyword arguments of :class:`RankController`; in the latter case the
    controller is built in ``on_train_begin`` from the Trainer's model and optimizer. Resize events are appended
    to ``events`` and reported to the Trainer's log as ``rank/<layer>``.

    Checkpoints and resume: the controller state (step count, EMAs, ranks) is saved with every checkpoint, in
    ``trainer_state.json`` (transformers' stateful-callback mechanism, :meth:`state`) and as
    ``<checkpoint>/rank_controller.json``. On ``trainer.train(resume_from_checkpoint=...)`` the Trainer loads
    the model first (a ``LowRankLinear`` takes the checkpoint's ranks while loading), then the optimizer; in
    ``on_train_begin`` this callback restores the controller state from the resumed ``trainer_state.json``,
    so the resumed run takes the same decisions as an uninterrupted one. This works whether or not
    ``TrainingArguments.restore_callback_states_from_checkpoint`` is set; when it is, the Trainer rebuilds the
    callback from :meth:`state`'s ``args`` (the controller's :meth:`RankController.config`).

    Single process only: under DDP the Trainer's wrapper would have to be rebuilt after a resize, which a
    callback cannot do (use :class:`RankController` with :func:`rewrap_ddp` in your own loop).
    """

    STATE_FILE = "rank_controller.json"

    def __init__(self, controller: RankController | None = None, restored_state: dict | None = None,
                 **controller_kwargs) -> None:
        if controller is not None and controller_kwargs:
            raise ValueError(f"pass either a controller or its keyword arguments, not both: "
                             f"{sorted(controller_kwargs)}")
        self.controller = controller
        self.controller_kwargs = controller_kwargs
        # a controller state to load in on_train_begin (set by a resume)
        self.restored_state = restored_state
        self.events = []

    # ---------------------------------------------------------------------------- stateful callback
    def state(self) -> dict:
        """transformers' ``ExportableState``: ``args`` rebuild an equal callback, ``attributes`` hold the
        controller's :meth:`RankController.state_dict` (None before training begins)."""
        args = self.controller.config() if self.controller is not None else dict(self.controller_kwargs)
        controller_state = self.controller.state_dict() if self.controller is not None else self.restored_state
        return {"args": args, "attributes": {"restored_state": controller_state}}

    def _resumed_state(self, state) -> dict | None:
        """The controller state saved in the checkpoint being resumed (None on a fresh start)."""
        if self.restored_state is not None:
            return self.restored_state
        if not getattr(state, "global_step", 0):
            return None
        saved = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
        if isinstance(saved, list):  # several callbacks of this class: the first is ours
            saved = saved[0] if saved else None
        if isinstance(saved, dict):
            return (saved.get("attributes") or {}).get("restored_state")
        return None

    # ------------------------------------------------------------------------------------- events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if getattr(args, "world_size", 1) > 1:
            raise NotImplementedError("RankControllerCallback does not support distributed Trainer runs; use "
                                      "RankController with rewrap_ddp in a custom training loop")
        if self.controller is None:
            if model is None:
                raise ValueError("Trainer passed no model to on_train_begin")
            self.controller = RankController(model, optimizer, **self.controller_kwargs)
        elif optimizer is not None:
            self.controller.optimizer = unwrap_optimizer(optimizer)
        resumed = self._resumed_state(state)
        if resumed is not None:
            # The Trainer has loaded the checkpoint's weights (ranks included) and optimizer state already, so
            # this restores the counters and EMAs; a layer still at another rank is resized (state reset).
            self.controller.load_state_dict(resumed)
            self.restored_state = None
        return control

    def on_step_end(self, args, state, control, **kwargs):
        new = self.controller.step()
        if new:
            self.events.extend(new)
            state.log_history.append({"step": state.global_step,
                                      **{f"rank/{e.layer}": e.new_rank for e in new}})
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.controller is not None and state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, self.STATE_FILE), "w", encoding="utf-8") as f:
                json.dump(self.controller.state_dict(), f)
        return control
