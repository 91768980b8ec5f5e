"""Adapters: spectral (heavy-tailed) LoRA rank allocation and TensLoRA tensor adapters."""

from . import spectral, tenslora, tenslora_plus
from .spectral import adaptive_lora_config, get_adaptive_lora_config, spectral_table
from .tenslora import apply_tenslora
from .tenslora_plus import allocate_ranks, mode_metrics, param_groups, resize_adapter

__all__ = ["adaptive_lora_config", "allocate_ranks", "apply_tenslora", "get_adaptive_lora_config", "mode_metrics",
           "param_groups", "resize_adapter", "spectral", "spectral_table", "tenslora", "tenslora_plus"]
