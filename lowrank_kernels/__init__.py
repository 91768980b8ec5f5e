"""lowrank-kernels: fast low-rank training and adaptive-rank fine-tuning for PyTorch.

Importing the package needs neither a GPU, nor triton, nor the compiled extension.
"""

from . import backend, ops
from ._ext import HAS_CUDA_EXT, HAS_EXT

__version__ = "0.1.0"

__all__ = ["HAS_CUDA_EXT", "HAS_EXT", "__version__", "backend", "ops"]
