"""Adaptive rank: stable-rank estimation, RankController, resize with optimizer-state remap."""

from .controller import RankController, ResizeEvent, rewrap_ddp, stable_ranks_of
from .resize import remap_lowrank_state, reset_state, resize_many, resize_with_state

__all__ = ["RankController", "RankControllerCallback", "ResizeEvent", "remap_lowrank_state", "reset_state",
           "resize_many", "resize_with_state", "rewrap_ddp", "stable_ranks_of"]


def __getattr__(name):
    # transformers is optional and slow to import: load the callback only when asked for
    if name == "RankControllerCallback":
        from .callback import RankControllerCallback

        return RankControllerCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
