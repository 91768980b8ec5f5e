"""Shared pytest setup.

Without a visible GPU the Triton kernels run under the interpreter: ``TRITON_INTERPRET=1`` must be
set before ``triton`` is first imported, which is why it happens here, at collection time.
"""

import os
import random

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Every test sees the default backend unless it asks for one (a user's env must not leak in).
os.environ.pop("LOWRANK_KERNELS_BACKEND", None)

DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (runs on the GPU machine only)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on the CPU")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread per test: the shapes here are tiny, and on a shared 2-core machine OpenMP
    threads spin against other processes (measured 6x to 100x slower with 2 threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)
    random.seed(0)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def triton_backend(monkeypatch):
    """Force the Triton kernels: interpreted on a CPU-only machine, compiled on a GPU machine.

    With a GPU, triton is imported without the interpreter, so only CUDA tensors can reach a kernel:
    on the GPU machine run the ``gpu``-marked tests (``.ci/gpu``); CPU CI runs the rest interpreted.
    (Making CUDA the default device here was tried and broke every test that draws from a CPU
    ``torch.Generator``.)
    """
    pytest.importorskip("triton")
    monkeypatch.setenv("LOWRANK_KERNELS_BACKEND", "triton")
    return "triton"


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("LOWRANK_KERNELS_BACKEND", "torch")
    return "torch"
