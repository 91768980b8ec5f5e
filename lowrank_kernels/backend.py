"""The one place that decides which implementation runs a call: ``composed``, ``triton``, ``cuda`` or ``torch``.

Controlled by ``LOWRANK_KERNELS_BACKEND`` (read on every call, so tests can switch it):

* ``auto`` (default): for the GEMM ops with a cuBLAS-composed form (:data:`COMPOSED_OPS`:
  ``lora_matmul``, ``lowrank_matmul``) :func:`pick` follows :data:`TABLE`, a committed table keyed by
  ``(op, device, dtype, shape class)`` that GPU runs fill (``python -m bench.report --backend-table``);
  a key that was never measured gets the composed path (big GEMMs stay in cuBLAS, see DESIGN.md). For the
  other Triton-backed ops :func:`choose` picks Triton for CUDA tensors when triton imports, else the
  PyTorch reference.
* ``triton``: always the Triton kernel. CUDA tensors run compiled; CPU tensors run under the
  Triton interpreter, which must have been enabled with ``TRITON_INTERPRET=1`` *before* triton was
  imported (this is how CI checks kernels without a GPU). Where the interpreter computes a dtype wrongly
  (:data:`INTERPRETER_WRONG_DTYPES`: its bf16 ``tl.dot``) :func:`pick` answers with the reference instead,
  so a forced backend never returns a silently wrong result.
* ``torch``: always the pure-PyTorch reference (the oracle the tests compare against).

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
Impl = Literal["composed", "triton", "torch"]
_VALID = ("auto", "triton", "torch")
ENV_VAR = "LOWRANK_KERNELS_BACKEND"

#: Ops with a cuBLAS-composed implementation that :func:`pick` chooses between it and Triton for.
COMPOSED_OPS = ("lora_matmul", "lowrank_matmul")
#: Dtypes whose ``tl.dot`` the Triton interpreter gets wrong (measured errors ~1e9 for bf16): a forced
#: ``triton`` backend on CPU tensors of these dtypes answers with the PyTorch reference.
INTERPRETER_WRONG_DTYPES = (torch.bfloat16,)
#: Problems with at least this much GEMM work (``M * in * out``) are shape class ``large``.
LARGE_WORK = 2**32

# The measured winners, ``"op/device/dtype/shape class": "triton" | "composed"``. Generated from the results
# CSVs by ``python -m bench.report --backend-table`` (rows where ``composed`` and ``triton`` were both timed in
# mode ``full``); edit through that command, not by hand. A key not listed runs the composed path.
# backend-table:start
TABLE: dict[str, str] = {}
# backend-table:end


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


def shape_class(m: int, in_features: int, out_features: int, rank: int) -> str:
    """The table's shape class of a ``(M, in) x (in, out)`` product carrying a rank-``rank`` term.

    ``"<size>-r<R>"``: size ``large`` when ``M * in * out >= LARGE_WORK`` (cuBLAS is compute bound there),
    else ``small``; ``R`` is ``rank`` rounded up to a power of two >= 16 (``tl.dot``'s smallest tile), or
    ``gt256`` above 256 (the Triton kernels' largest rank).
    """
    size = "large" if m * in_features * out_features >= LARGE_WORK else "small"
    if rank > 256:
        return f"{size}-rgt256"
    return f"{size}-r{max(16, 1 << max(0, rank - 1).bit_length())}"


def table_key(op: str, device: str, dtype: torch.dtype, cls: str) -> str:
    """Key of :data:`TABLE`: ``"op/device/dtype/shape class"``, e.g. ``lora_matmul/cuda/bfloat16/large-r16``."""
    return f"{op}/{device}/{str(dtype).replace('torch.', '')}/{cls}"


def _check_table(table: dict) -> None:
    for key, value in table.items():
        if key.count("/") != 3 or key.split("/")[0] not in COMPOSED_OPS:
            raise ValueError(f"backend TABLE key {key!r} is not 'op/device/dtype/shape class' of {COMPOSED_OPS}")
        if value not in ("composed", "triton"):
            raise ValueError(f"backend TABLE[{key!r}] = {value!r} is not 'composed' or 'triton'")


_check_table(TABLE)

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def pick(op: str, *tensors: torch.Tensor | None, shape: str = "",
         triton_dtypes: tuple[torch.dtype, ...] = _TRITON_DTYPES) -> Impl:
    """``"composed"``, ``"triton"`` or ``"torch"`` for a call of a :data:`COMPOSED_OPS` op on ``tensors``.

    Args:
        op: the op's stem (``lora_matmul`` or ``lowrank_matmul``).
        tensors: the call's tensors (``None`` entries are ignored); they share one device and dtype.
        shape: the call's :func:`shape_class`.
        triton_dtypes: the dtypes the op's Triton kernel serves; others never get ``"triton"``.

    Rules: ``torch`` forced -> ``"torch"``. ``triton`` forced -> ``"triton"``, except CPU tensors of
    :data:`INTERPRETER_WRONG_DTYPES` (-> ``"torch"``, the interpreter would be wrong) and dtypes outside
    ``triton_dtypes`` (-> ``"composed"``); raises ``RuntimeError`` when the kernel cannot run (as
    :func:`choose`). ``auto`` -> the :data:`TABLE` entry for CUDA tensors when triton imports, else
    ``"composed"``.
    """
    if op not in COMPOSED_OPS:
        raise ValueError(f"pick: {op!r} has no composed implementation; ops with one: {COMPOSED_OPS}")
    want = requested_backend()
    if want == "torch":
        return "torch"
    present = [t for t in tensors if isinstance(t, torch.Tensor)]
    devices = _devices(present)
    dtype = present[0].dtype if present else None
    if want == "triton":
        if devices <= {"cpu"} and dtype in INTERPRETER_WRONG_DTYPES:
            return "torch"
        if dtype not in triton_dtypes:
            return "composed"
        choose(*present, op=op)  # raises when the forced kernel cannot run here
        return "triton"
    if devices == {"cuda"} and dtype in triton_dtypes and triton_available():
        return TABLE.get(table_key(op, "cuda", dtype, shape), "composed")  # type: ignore[return-value]
    return "composed"


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
        "table_entries": len(TABLE),
    }
