"""The one place that decides which implementation runs a call: ``triton``, ``cuda`` or ``torch``.

Controlled by ``LOWRANK_KERNELS_BACKEND`` (read on every call, so tests can switch it):

* ``auto`` (default): Triton for CUDA tensors when triton imports, else the PyTorch reference.
* ``triton``: always the Triton kernel. CUDA tensors run compiled; CPU tensors run under the
  Triton interpreter, which must have been enabled with ``TRITON_INTERPRET=1`` *before* triton was
  imported (this is how CI checks kernels without a GPU).
* ``torch``: always the pure-PyTorch reference.

The compiled C++/CUDA extension (``lowrank_kernels._C``) is chosen for its ops whenever it loaded
and supports the tensors' device, unless the backend is ``torch``.

Nothing here touches a GPU or imports triton at module import time.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

from . import _ext

Backend = Literal["triton", "cuda", "torch"]
_VALID = ("auto", "triton", "torch")
ENV_VAR = "LOWRANK_KERNELS_BACKEND"


def requested_backend() -> str:
    """The backend asked for by ``LOWRANK_KERNELS_BACKEND`` (``auto`` when unset)."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in _VALID:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {_VALID}")
    return value


def interpreter_enabled() -> bool:
    """True when the Triton interpreter was requested (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


_TRITON_STATE: list[str | None] = []  # filled once; a plain list, not lru_cache, which dynamo warns about


def _triton_import_error() -> str | None:
    if not _TRITON_STATE:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception as exc:  # pragma: no cover - depends on the environment
            _TRITON_STATE.append(f"{type(exc).__name__}: {exc}")
        else:
            _TRITON_STATE.append(None)
    return _TRITON_STATE[0]


def triton_available() -> bool:
    """Whether ``import triton`` succeeds in this environment (cached)."""
    return _triton_import_error() is None


def _devices(tensors) -> set[str]:
    return {t.device.type for t in tensors if isinstance(t, torch.Tensor)}


def choose(*tensors: torch.Tensor, op: str = "op") -> Backend:
    """Pick ``"triton"`` or ``"torch"`` for a Triton-backed op called on ``tensors``.

    Raises ``RuntimeError`` when ``triton`` is forced but cannot run on these tensors.
    """
    want = requested_backend()
    devices = _devices(tensors)
    if want == "torch":
        return "torch"
    on_cuda = devices == {"cuda"}
    if want == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    # forced triton
    if not triton_available():
        raise RuntimeError(f"{ENV_VAR}=triton but triton cannot be imported ({_triton_import_error()})")
    if on_cuda:
        return "triton"
    if devices <= {"cpu"}:
        if not interpreter_enabled():
            raise RuntimeError(
                f"{ENV_VAR}=triton with CPU tensors for {op} needs the Triton interpreter: "
                "set TRITON_INTERPRET=1 before triton is imported"
            )
        return "triton"
    raise RuntimeError(f"{op}: the Triton backend cannot run tensors on devices {sorted(devices)}")


def use_extension(*tensors: torch.Tensor) -> bool:
    """Whether ops of the compiled extension should serve these tensors."""
    if requested_backend() == "torch" or not _ext.HAS_EXT:
        return False
    devices = _devices(tensors)
    if devices <= {"cpu"}:
        return True
    if devices == {"cuda"}:
        return _ext.HAS_CUDA_EXT
    return False


def describe() -> dict:
    """A summary of what is available, for bug reports and benchmark rows."""
    return {
        "requested": requested_backend(),
        "triton": triton_available(),
        "triton_interpret": interpreter_enabled(),
        "ext": _ext.HAS_EXT,
        "cuda_ext": _ext.HAS_CUDA_EXT,
        "ext_error": _ext.LOAD_ERROR,
        "cuda": torch.cuda.is_available(),
    }
