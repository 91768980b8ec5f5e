"""Low-rank and LoRA modules (drop-in replacements for nn.Linear)."""
