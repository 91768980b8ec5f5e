"""Adapters: spectral (heavy-tailed) LoRA rank allocation and TensLoRA tensor adapters."""

from . import spectral, tenslora
from .spectral import adaptive_lora_config, get_adaptive_lora_config, spectral_table
from .tenslora import allocate_ranks, apply_tenslora, mode_metrics, param_groups

__all__ = ["adaptive_lora_config", "allocate_ranks", "apply_tenslora", "get_adaptive_lora_config", "mode_metrics",
           "param_groups", "spectral", "spectral_table", "tenslora"]
