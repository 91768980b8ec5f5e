"""Functional ops. Each stem has a pure-PyTorch ``<op>_ref`` (the oracle and CPU fallback), its
autograd/custom-op registration and the public function. Dispatch is decided in ``backend.py``."""

from .lora_matmul import lora_matmul, lora_matmul_ref
from .lowrank_matmul import lowrank_matmul, lowrank_matmul_ref
from .pad_slices import gather_slices, pad_slices
from .q3r_apply import q3r_apply, q3r_apply_ref

__all__ = ["gather_slices", "lora_matmul", "lora_matmul_ref",
           "lowrank_matmul", "lowrank_matmul_ref", "pad_slices", "q3r_apply", "q3r_apply_ref"]
