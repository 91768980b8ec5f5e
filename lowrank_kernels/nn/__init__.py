"""Low-rank and LoRA modules (drop-in replacements for nn.Linear), converters, and low-rank checkpoints."""

from .convert import PeftFusedLoRALinear, fuse_peft_lora, replace_linear, tied_parameters
from .lora_linear import LoRALinear
from .lowrank_linear import LowRankLinear, ResizeInfo
from .pretrained import LowRankPretrainedMixin, load_lowrank_pretrained, lowrank_layers, save_lowrank_pretrained

__all__ = ["LoRALinear", "LowRankLinear", "LowRankPretrainedMixin", "PeftFusedLoRALinear", "ResizeInfo",
           "fuse_peft_lora", "load_lowrank_pretrained", "lowrank_layers", "replace_linear", "save_lowrank_pretrained",
           "tied_parameters"]
