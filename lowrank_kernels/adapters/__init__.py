"""Adapters: spectral (heavy-tailed) LoRA rank allocation and TensLoRA tensor adapters."""
