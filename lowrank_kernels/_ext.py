"""Guarded load of the compiled extension ``lowrank_kernels._C``.

Importing the package never requires the extension: when it is missing (a pure-Python install with
``LOWRANK_KERNELS_SKIP_EXT=1``, or a failed build) the ops fall back to their PyTorch references and
``LOAD_ERROR`` keeps the reason so that :func:`require_ext` can raise a clear message.
"""

from __future__ import annotations

HAS_EXT: bool = False
HAS_CUDA_EXT: bool = False
LOAD_ERROR: str | None = None

try:
    from . import _C  # type: ignore[attr-defined]  # noqa: F401  (registers torch.ops.lowrank_kernels.*)

    HAS_EXT = True
    HAS_CUDA_EXT = bool(getattr(_C, "WITH_CUDA", 0))
except Exception as exc:  # ImportError, or an undefined symbol from an ABI mismatch
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"


def require_ext() -> None:
    """Raise ``RuntimeError`` explaining why the compiled extension is unavailable."""
    if not HAS_EXT:
        raise RuntimeError(
            "lowrank_kernels._C is not available "
            f"({LOAD_ERROR}); reinstall with `pip install --no-build-isolation -e .` "
            "and without LOWRANK_KERNELS_SKIP_EXT"
        )
