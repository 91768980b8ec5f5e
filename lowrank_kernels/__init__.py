"""lowrank-kernels: fast low-rank training and adaptive-rank fine-tuning for PyTorch.

Importing the package needs neither a GPU, nor triton, nor the compiled extension, nor the training app's
extra dependencies (:mod:`lowrank_kernels.app`).
"""

from . import backend, ops
from ._ext import HAS_CUDA_EXT, HAS_EXT
from .q3r import Q3R, AdamQ3R, extract_linear

__version__ = "0.1.0"

__all__ = ["AdamQ3R", "HAS_CUDA_EXT", "HAS_EXT", "Q3R", "__version__", "backend", "extract_linear", "ops"]
