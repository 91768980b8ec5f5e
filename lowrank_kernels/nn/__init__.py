"""Low-rank and LoRA modules (drop-in replacements for nn.Linear)."""

from .convert import fuse_peft_lora, replace_linear
from .lora_linear import LoRALinear
from .lowrank_linear import LowRankLinear, ResizeInfo

__all__ = ["LoRALinear", "LowRankLinear", "ResizeInfo", "fuse_peft_lora", "replace_linear"]
