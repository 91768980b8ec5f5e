"""Low-rank and LoRA modules (drop-in replacements for nn.Linear)."""

from .lowrank_linear import LowRankLinear, ResizeInfo

__all__ = ["LowRankLinear", "ResizeInfo"]
