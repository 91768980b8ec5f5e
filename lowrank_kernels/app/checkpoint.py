"""Training checkpoints: a verified, tensors-and-primitives-only file, written atomically.

File layout (``checkpoint.pt``)::

    LOWRANK-KERNELS-CHECKPOINT 1\\n
    sha256 <64 hex digits> <payload length in bytes>\\n
    <payload: torch.save of a dict of tensors, dicts, lists, tuples, str, int, float, bool, None>

Guarantees:

* **Nothing but data is unpickled.** The payload is read with ``torch.load(weights_only=True)`` and an
  empty allow-list: tensors and Python containers/primitives only. A pickle that would import or call
  anything (``os.system`` via ``__reduce__``...) is refused before any of it runs. The only non-tensor,
  non-primitive value a run holds, NumPy's RNG state, is stored as a tensor plus ints (see :func:`rng_state`).
* **Integrity.** The header holds the SHA-256 of the payload and its length; both are checked before the
  payload is unpickled, so any corruption (a zeroed word, a truncated file) gives a :class:`CheckpointError`
  naming the file. Header damage is refused the same way.
* **Atomic writes.** The bytes go to ``<name>.tmp`` in the same folder, are ``fsync``-ed, then
  ``os.replace``-d over the old file (and the folder is ``fsync``-ed where the OS allows): a process killed
  at any point leaves either the previous checkpoint or the new one, never a mix.
* **Complete.** :func:`load_checkpoint` checks the keys the trainer needs (``REQUIRED``, and the RNG streams
  in ``RNG_KEYS``) and names the missing ones; :func:`restore` turns a state dict that does not fit the
  model/optimizer/... into a :class:`CheckpointError` naming the file and the part.

Under ``torchrun`` (``distributed`` ddp / fsdp2) a checkpoint is a set of files: ``checkpoint.pt`` (written by
rank 0: the whole model state, as one process holds it, the scheduler, technique state, rank 0's RNG,
``world_size`` and ``optimizer: None``) and one ``checkpoint-step<S>.rank<r>.pt`` per process (its own optimizer
state, e.g. AdamQ3R's ``DTensor`` moments under FSDP2, and its RNG; ``RANK_REQUIRED``). The rank files carry the
step in their names and are written (and synchronised) before ``checkpoint.pt`` replaces the old one; the files of
older steps are deleted only after that, so a run killed at any point leaves a complete, consistent set.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError

MAGIC = b"LOWRANK-KERNELS-CHECKPOINT 1\n"
REQUIRED = ("config", "step", "elapsed", "model", "optimizer", "scheduler", "technique", "rng", "spectra_before")
RNG_KEYS = ("torch", "python", "numpy")
RANK_REQUIRED = ("rank", "world_size", "step", "optimizer", "rng")
_HEADER_MAX = 200  # bytes: the sha256 line is < 100


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used: not ours, corrupted, incomplete, or not fitting this run."""


# ---------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    """Every RNG stream a run draws from, as tensors and primitives (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "python": random.getstate(),
          "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
                    "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    n = st["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# -------------------------------------------------------------------------------------------- write
def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """Write ``obj`` (tensors and Python primitives only) to ``path`` atomically, with its SHA-256."""
    path = Path(path)
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    header = MAGIC + f"sha256 {hashlib.sha256(payload).hexdigest()} {len(payload)}\n".encode()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header)
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable; not possible on every OS / file system
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------- read
def _verified_payload(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read: {exc}") from None
    if not data.startswith(MAGIC):
        raise CheckpointError(f"checkpoint {str(path)!r} is not a lowrank-kernels checkpoint (its header is missing "
                              f"or damaged; files from older versions, plain torch.save files and pickles are not "
                              f"loaded)")
    end = data.find(b"\n", len(MAGIC), len(MAGIC) + _HEADER_MAX)
    parts = data[len(MAGIC):end].split(b" ") if end > 0 else []
    try:
        if len(parts) != 3 or parts[0] != b"sha256" or len(parts[1]) != 64:
            raise ValueError
        digest, length = parts[1].decode("ascii"), int(parts[2])
        int(digest, 16)
    except ValueError:
        raise CheckpointError(f"checkpoint {str(path)!r} has a damaged header (no valid sha256 line)") from None
    payload = data[end + 1:]
    if len(payload) != length:
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated or padded: {len(payload)} payload bytes, "
                              f"the header says {length}")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupted: its SHA-256 does not match the one stored "
                              f"in its header")
    return payload


def load_checkpoint(path: str | os.PathLike, required: tuple[str, ...] = REQUIRED) -> dict:
    """The dict saved by :func:`save_checkpoint`, after checking its digest and its keys.

    Raises:
        CheckpointError (a ``ValueError``): the file is missing, not a checkpoint, corrupted, holds anything
            but tensors and primitives, or lacks one of ``required`` (or an RNG stream of ``RNG_KEYS``).
            The message names the file.
    """
    path = Path(path)
    payload = _verified_payload(path)
    try:
        obj = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - an UnpicklingError for a forbidden global, or a bad archive
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} holds something other than tensors and plain Python "
                              f"values and was not loaded ({first})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} must hold a dict, got {type(obj).__name__}")
    missing = [k for k in required if k not in obj]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks {', '.join(map(repr, missing))}: it cannot resume "
                              f"this run")
    if "rng" in required:
        rng = obj["rng"]
        lost = [k for k in RNG_KEYS if not isinstance(rng, dict) or k not in rng]
        if lost:
            raise CheckpointError(f"checkpoint {str(path)!r}: its 'rng' lacks the {', '.join(lost)} state, so the "
                                  f"resumed run would not reproduce the uninterrupted one")
    if "config" in required and not isinstance(obj["config"], dict):
        raise CheckpointError(f"checkpoint {str(path)!r}: 'config' must be a dict, got {type(obj['config']).__name__}")
    return obj


def restore(path: str | os.PathLike, parts: list[tuple[str, Callable[[], object]]]) -> None:
    """Run each ``(name, load)`` in order; an error from loading part ``name`` becomes a ``CheckpointError``.

    ``load_state_dict`` of a model, optimizer or scheduler raises ``RuntimeError`` / ``KeyError`` /
    ``ValueError`` / ``IndexError`` / ``TypeError`` for a state that does not fit (a missing key, another
    shape); the message then names the checkpoint file and the part.
    """
    for name, load in parts:
        try:
            load()
        except (RuntimeError, KeyError, ValueError, IndexError, TypeError, AttributeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"checkpoint {str(path)!r}: its {name} state does not fit this run "
                                  f"({type(exc).__name__}: {first})") from None


# ----------------------------------------------------------------------------- one file per process
def rank_checkpoint_path(path: str | os.PathLike, step: int, rank: int) -> Path:
    """``checkpoint-step<step>.rank<rank>.pt`` next to ``path`` (``checkpoint.pt``): one process's own state."""
    path = Path(path)
    return path.with_name(f"{path.stem}-step{step}.rank{rank}{path.suffix}")


def prune_rank_checkpoints(path: str | os.PathLike, keep_step: int) -> None:
    """Delete the rank files of ``path`` whose step is not ``keep_step`` (call after ``path`` is written)."""
    path = Path(path)
    keep = f"{path.stem}-step{keep_step}.rank"
    for f in path.parent.glob(f"{path.stem}-step*.rank*{path.suffix}"):
        if not f.name.startswith(keep):
            f.unlink(missing_ok=True)


def load_rank_checkpoint(path: str | os.PathLike, step: int, rank: int, world_size: int) -> dict:
    """Process ``rank``'s file of the checkpoint ``path`` saved at ``step`` by ``world_size`` processes, checked
    (digest, keys, and that it belongs to that rank, step and world size)."""
    f = rank_checkpoint_path(path, step, rank)
    if not f.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} was saved at step {step} but its file for process {rank}, "
                              f"{str(f)!r}, is missing")
    obj = load_checkpoint(f, RANK_REQUIRED)
    got = (obj["rank"], obj["world_size"], obj["step"])
    if got != (rank, world_size, step):
        raise CheckpointError(f"checkpoint {str(f)!r} holds rank {got[0]} of {got[1]} at step {got[2]}, expected "
                              f"rank {rank} of {world_size} at step {step}")
    return obj
