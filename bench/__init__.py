"""Benchmark suite for lowrank-kernels: ``python -m bench --quick`` (CPU, seconds) or ``--full`` (GPU).

Each kernel has ``bench/bench_<stem>.py`` exposing ``run(quick, device) -> list[dict]``; the shared
timing, memory and CSV helpers live in :mod:`bench.common`. See ``bench/README.md``.
"""

import os

import torch

# Without a GPU the Triton providers run under the interpreter, which must be switched on before
# triton is first imported; every bench script is imported after this package, so here is early enough.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
