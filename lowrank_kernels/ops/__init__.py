"""Functional ops. Each stem has a pure-PyTorch ``<op>_ref`` (the oracle and CPU fallback), its
autograd/custom-op registration and the public function. Dispatch is decided in ``backend.py``."""

from .lora_matmul import lora_matmul, lora_matmul_ref
from .lowrank_matmul import lowrank_matmul, lowrank_matmul_ref
from .pad_slices import gather_slices, pad_slices
from .power_iteration import (
    PowerIterationState,
    spectral_norm,
    spectral_norm_factored,
    spectral_norm_ref,
    spectral_stats,
    stable_rank,
    stable_rank_factored,
)
from .q3r_apply import q3r_apply, q3r_apply_ref
from .truncated_svd import truncated_svd, truncated_svd_ref

__all__ = ["gather_slices", "lora_matmul", "lora_matmul_ref",
           "lowrank_matmul", "lowrank_matmul_ref", "pad_slices", "q3r_apply", "q3r_apply_ref",
           "PowerIterationState", "spectral_norm", "spectral_norm_factored", "spectral_norm_ref", "spectral_stats",
           "stable_rank", "stable_rank_factored", "truncated_svd", "truncated_svd_ref"]
