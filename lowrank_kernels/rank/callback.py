"""``transformers.TrainerCallback`` that runs a :class:`RankController` inside ``Trainer``.

Importing this module imports ``transformers`` (an optional dependency); ``lowrank_kernels.rank`` only
imports it when ``RankControllerCallback`` is first accessed.
"""

from __future__ import annotations

import json
import os

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError("RankControllerCallback needs `transformers` (pip install transformers)") from exc

from .controller import RankController
from .resize import unwrap_optimizer


class RankControllerCallback(TrainerCallback):
    """Calls ``controller.step()`` after every optimizer step of a ``Trainer``.

    Pass a ready ``controller`` or the keyword arguments of :class:`RankController`; in the latter case the
    controller is built in ``on_train_begin`` from the Trainer's model and optimizer. Resize events are appended
    to ``events`` and reported to the Trainer's log as ``rank/<layer>``. On each checkpoint save the controller
    state goes to ``<checkpoint>/rank_controller.json``.

    Single process only: under DDP the Trainer's wrapper would have to be rebuilt after a resize, which a
    callback cannot do (use :class:`RankController` with :func:`rewrap_ddp` in your own loop).
    """

    STATE_FILE = "rank_controller.json"

    def __init__(self, controller: RankController | None = None, **controller_kwargs) -> None:
        if controller is not None and controller_kwargs:
            raise ValueError(f"pass either a controller or its keyword arguments, not both: "
                             f"{sorted(controller_kwargs)}")
        self.controller = controller
        self.controller_kwargs = controller_kwargs
        self.events = []

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
