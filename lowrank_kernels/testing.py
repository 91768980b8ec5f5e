"""Test helpers shared by ``python_tests`` and ``bench`` (importable by users' own tests too):
tolerance-aware comparisons and :func:`count_gpu_cost`, the launch / host-sync / allocation counter."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode


def assert_verbose_allclose(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-8,
                            max_print: int = 5, name: str = "tensor") -> None:
    """Like ``torch.testing.assert_close`` but prints how many elements differ and where.

    Compares in fp64; NaN never equals anything (a NaN where a number was expected fails).
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    diff = (a - e).abs()
    tol = atol + rtol * e.abs()
    bad = ~(diff <= tol)  # NaN compares False, so it is counted as bad
    n_bad = int(bad.sum())
    if n_bad:
        idx = bad.nonzero()[:max_print].tolist()
        lines = [f"  at {tuple(i)}: actual={a[tuple(i)].item():.6g} expected={e[tuple(i)].item():.6g}" for i in idx]
        worst = float(torch.nan_to_num(diff, nan=float("inf")).max())
        raise AssertionError(
            f"{name}: {n_bad}/{a.numel()} elements differ (rtol={rtol}, atol={atol}, max abs diff={worst:.3g})\n"
            + "\n".join(lines)
        )


def max_abs_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.detach().double() - expected.detach().double()).abs().max()) if actual.numel() else 0.0


def assert_close_to_reference(out: torch.Tensor, ref_fp64: torch.Tensor, same_precision: torch.Tensor,
                              name: str = "tensor", factor: float = 2.0, atol: float = 1e-5) -> None:
    """flash-attention's honest low-precision tolerance.

    ``out`` (the kernel) must be no further from ``ref_fp64`` (the reference computed in fp64)
    than ``factor`` times the error of ``same_precision`` (the PyTorch reference run in the
    kernel's own dtype), plus ``atol``.
    """
    err = max_abs_err(out, ref_fp64)
    base = max_abs_err(same_precision, ref_fp64)
    bound = factor * base + atol
    if not err <= bound:
        raise AssertionError(f"{name}: max error {err:.3g} > {factor} x torch error {base:.3g} + {atol:g}")


# ------------------------------------------------------------------------------- GPU cost, counted anywhere
_aten = torch.ops.aten
# Ops that only allocate or read metadata: no kernel runs on a GPU.
_NO_LAUNCH = {
    _aten.empty.memory_format, _aten.empty_strided.default, _aten.empty_like.default, _aten.new_empty.default,
    _aten.new_empty_strided.default, _aten.resize_.default, _aten.set_.source_Storage_storage_offset,
    _aten.sym_size.int, _aten.sym_stride.int, _aten.sym_numel.default, _aten.sym_storage_offset.default,
    _aten.is_same_size.default, _aten._has_compatible_shallow_copy_type.default, _aten.lift_fresh.default,
}
# Ops whose result size or value the host must wait for (a device-to-host sync on CUDA).
_SYNC_OPS = {
    _aten._local_scalar_dense.default, _aten.nonzero.default, _aten.masked_select.default,
    _aten.is_nonzero.default, _aten.equal.default, _aten._unique2.default, _aten.unique_dim.default,
    _aten.unique_consecutive.default, _aten._linalg_check_errors.default,
    # eigh and svd check their ``info`` on the host inside the kernel call (not a separate op):
    _aten._linalg_eigh.default, _aten._linalg_svd.default,
}
_SYNC_ONLY = {_aten._linalg_check_errors.default, _aten._local_scalar_dense.default}
# Tensor methods that read tensor data on the host (counted once, at the Python call).
_HOST_READS = {
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__bool__,
    torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__,
}


@dataclasses.dataclass
class GPUCost:
    """What :func:`count_gpu_cost` counted.

    Attributes:
        launches: aten ops that launch a kernel on a GPU (views, metadata and bare allocations excluded;
            composite ops are counted as the ops they decompose into) plus Triton kernel launches.
        triton_launches: the Triton launches among ``launches``.
        syncs: host reads of tensor data (``item``, ``tolist``, ``bool(t)``, ``float(t)``, ``int(t)``,
            ``.cpu()``, ``.numpy()``, ``_local_scalar_dense``) and ops whose output size or error check needs
            the host (``nonzero``, ``masked_select``, ``unique``, linalg error checks).
        large: ``(op name, shape)`` of every tensor created (not a view, not written in place) with at least
            ``min_numel`` elements.
        ops: launches per aten op name (for reading a regression).
    """

    launches: int = 0
    triton_launches: int = 0
    syncs: int = 0
    large: list = dataclasses.field(default_factory=list)
    ops: Counter = dataclasses.field(default_factory=Counter)

    def per(self, n: int) -> dict:
        """``launches`` and ``syncs`` divided by ``n`` (e.g. steps), for amortised figures."""
        return {"launches": self.launches / n, "syncs": self.syncs / n}


class _CostDispatch(TorchDispatchMode):
    def __init__(self, cost: GPUCost, min_numel: int | None, state: dict):
        super().__init__()
        self.cost, self.min_numel, self.state = cost, min_numel, state

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        triton_before = self.cost.triton_launches
        out = func(*args, **(kwargs or {}))
        if self.cost.triton_launches != triton_before:
            return out  # a custom op that launched Triton kernels: those launches are its cost, counted already
        if func in _SYNC_OPS:
            if self.state["host_read_depth"] == 0:
                self.cost.syncs += 1
            if func not in _SYNC_ONLY:
                self._launch(func)
        elif func not in _NO_LAUNCH and not func.is_view:
            self._launch(func)
            if self.min_numel is not None:
                returns = func._schema.returns
                outs = out if isinstance(out, (tuple, list)) else (out,)
                for ret, t in zip(returns, outs, strict=False):  # an op may return fewer tensors than declared
                    if (ret.alias_info is None and isinstance(t, torch.Tensor)
                            and t.numel() >= self.min_numel):
                        self.cost.large.append((str(func.overloadpacket.__name__), tuple(t.shape)))
        return out

    def _launch(self, func):
        self.cost.launches += 1
        self.cost.ops[func.overloadpacket.__name__] += 1


class _CostFunction(TorchFunctionMode):
    def __init__(self, cost: GPUCost, state: dict):
        super().__init__()
        self.cost, self.state = cost, state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func not in _HOST_READS:
            return func(*args, **(kwargs or {}))
        self.cost.syncs += 1
        self.state["host_read_depth"] += 1
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.state["host_read_depth"] -= 1


def _triton_run_methods() -> list:
    """The classes whose ``run`` launches a Triton kernel (compiled or interpreted); empty without triton.

    Imports triton when it is installed (a kernel module imported later would otherwise escape the count);
    ``TRITON_INTERPRET`` is read at that import exactly as at any other first import."""
    try:
        import triton.runtime.interpreter  # noqa: F401
        import triton.runtime.jit  # noqa: F401
    except Exception:  # triton missing or unusable: nothing of it can launch
        return []
    found = []
    for mod_name, cls_name in (("triton.runtime.jit", "JITFunction"),
                               ("triton.runtime.interpreter", "InterpretedFunction")):
        cls = getattr(sys.modules.get(mod_name), cls_name, None)
        if cls is not None and "run" in vars(cls):
            found.append(cls)
    return found


@contextlib.contextmanager
def count_gpu_cost(min_numel: int | None = None):
    """Count what a block of code would cost on a GPU, on any device (the CPU included).

    A GPU's time at small and medium shapes is set by kernel launches (several µs each) and host syncs
    (each drains the queue), not by FLOPs, so a CPU run that counts both predicts GPU cost. Usage::

        with count_gpu_cost(min_numel=M * out) as cost:
            opt.step()
        assert cost.launches <= 60 and cost.syncs == 0

    Args:
        min_numel: record every tensor created with at least this many elements in ``cost.large``.

    Yields:
        a :class:`GPUCost`, filled when the block exits (and live while it runs).

    Counts ops after autograd and composite decomposition (what a device kernel sees), backward included;
    Triton launches are counted where triton is imported (compiled or under ``TRITON_INTERPRET=1``).
    """
    cost = GPUCost()
    state = {"host_read_depth": 0}
    patched = []
    for cls in _triton_run_methods():
        original = vars(cls)["run"]

        def run(self, *args, __original=original, **kwargs):
            cost.launches += 1
            cost.triton_launches += 1
            return __original(self, *args, **kwargs)

        cls.run = run
        patched.append((cls, original))
    try:
        with _CostFunction(cost, state), _CostDispatch(cost, min_numel, state):
            yield cost
    finally:
        for cls, original in patched:
            cls.run = original


# ------------------------------------------------------------------------------- machine facts for result files
def device_name(device: str | torch.device | None = None) -> str:
    """Marketing name of the GPU (``NVIDIA H100 80GB HBM3``) or ``"CPU " + the CPU model``.

    ``None`` means the GPU when CUDA is available, else the CPU (where a benchmark or the demo runs)."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return "CPU " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return "CPU " + (platform.processor() or platform.machine() or "unknown")


def slugify(text: str) -> str:
    """File-name form of a name: lower case, runs of other characters as one ``-``."""
    import re

    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def git_commit(cwd: str | None = None) -> str:
    """Short hash of ``HEAD`` in ``cwd`` (the current folder by default); ``""`` outside a git checkout."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def q3r_reference_step(q3r, adamw: torch.optim.Optimizer, lr) -> None:
    """The oracle of one ``AdamQ3R`` step, on a reference copy of the model: ``q3r.update()`` (a ``Q3R`` over the
    copy's weights), ``adamw.step()``, then ``w -= lr * Q3R.grad[w]`` for every regularised weight, with the
    gradient taken at the weights before the Adam step (the decoupled term). ``lr``: a float, or
    ``{id(weight): lr}`` where param groups differ."""
    q3r.update()
    grads = q3r.grad
    adamw.step()
    with torch.no_grad():
        for w in q3r.params:
            w.sub_((lr[id(w)] if isinstance(lr, dict) else lr) * grads[w])


def run_processes(worker, nprocs: int, args: tuple, timeout: float) -> None:
    """Run ``worker(rank, *args)`` in ``nprocs`` spawned processes (``torch.multiprocessing``) and wait for all of
    them; after ``timeout`` seconds kill them and raise ``TimeoutError`` (a hung collective fails a test instead of
    hanging the suite). A worker's exception is re-raised by ``torch.multiprocessing``."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.spawn(worker, args=args, nprocs=nprocs, join=False)
    deadline = time.time() + timeout
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"{nprocs} worker processes did not finish in {timeout:g} s")


def exit_worker() -> None:
    """End a successful worker process of :func:`run_processes` without the interpreter's normal teardown.

    With torch 2.13's gloo, C++ static destructors at exit abort about one run in seven ("terminate called
    without an active exception") after all the work and the process group's destruction have finished; a
    failure before this call still raises and exits non-zero."""
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
