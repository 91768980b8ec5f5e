"""Benchmark AdamQ3R: optimizer step time vs ``torch.optim.AdamW`` and the upstream Q3R algorithm written plainly.

Parameter set (the issue's ViT-Tiny): 12 blocks, d=192, per block ``qkv 576x192`` (regularised as 3 slices),
``proj 192x192``, ``fc1 768x192``, ``fc2 192x768``, all with biases; AdamQ3R with ``steps=5``,
``target_rank=0.2``, ``lmbda=0.1``. The step time is amortised over one period of 5 steps (one operator
rebuild + 5 applications). The gradients are fixed random tensors whose sign flips every step (one
``_foreach_neg_``, timed for every provider): under a constant gradient Adam drifts every weight linearly,
the spectrum grows past the default schedule's non-increasing eps and the kept rank climbs towards
``min(m, n)`` (measured: 56-139 instead of ~38 after 50 steps), which is not what training looks like.

Kernel ``q3r``, mode ``step``, providers:

* ``adamw``: ``torch.optim.AdamW`` (its default implementation for the device), the target's baseline;
* ``adamw_fused``: ``torch.optim.AdamW(fused=True)``, the fastest AdamW torch has (on the CPU the same fused
  kernel now runs the Adam part of AdamQ3R's CPU path, so this is the stricter comparison);
* ``torch``: AdamQ3R with the Triton backend off: on a CPU its default path (``Q3R.decoupled_step_`` per weight,
  then one fused AdamW call per group), on a GPU the PyTorch reference of ``ops.q3r_apply`` per parameter;
  rebuilds warm-started from the previous singular vectors (the default, see :class:`Q3R`);
* ``triton``: AdamQ3R through the fused Triton kernel (GPU only);
* ``torch+cold`` / ``triton+cold``: AdamQ3R(warm_start=False), every rebuild a cold randomized SVD. (Rows named
  ``+warm_start`` in results before 2026-11-25 15:00 UTC measured the earlier opt-in warm start, one operator at a
  time, when the cold rebuild was the default.)
* ``upstream``: the upstream Q3R code's algorithm written plainly: a full SVD every 5 steps, dense ``L (m x m)`` and
  ``R (n x n)``, ``G = 2 lmbda L X R`` materialised and padded per slice, then AdamW and ``p -= lr G``.

Kernel ``q3r``, mode ``update``: one rebuild of every operator (what ``steps`` amortises), providers
``torch_svd`` (full ``torch.linalg.svd``), ``truncated_svd`` (``ops.truncated_svd`` as dispatched: its
randomized path on every ViT-Tiny matrix, since ``min(m, n) = 192`` is above its full-SVD cut-off
``SMALL_DIM = 128``; ``Q3R(warm_start=False)``) and ``warm_start`` (the default rebuild: one product with the
previous vectors, ``Q3R(warm_start=True)`` after its first, exact rebuild).
Until 2026-11-25 the cut-off was 192 and the dispatched path was the full SVD: rows of the providers
``torch+randomized_svd`` and ``truncated_svd_randomized`` in older results measured the randomized path then.

Metrics: ``time`` (ms per step, amortised over one period), ``launches`` and ``syncs`` (per step, counted over one
period by ``lowrank_kernels.testing.count_gpu_cost``; mode ``update``: per rebuild).

CPU runs use 2 torch threads (the issue's setting; ``LOWRANK_BENCH_THREADS`` overrides). Quick: 2 blocks of d=64,
one thread.
"""

from __future__ import annotations

import contextlib
import importlib
import os

import torch
from torch import nn

from bench.common import cost_rows, make_row, resolve_device, time_fn, time_interleaved
from lowrank_kernels import AdamQ3R, backend, ops
from lowrank_kernels.q3r import EPS_START, Q3R, resolve_rank

KERNEL = "q3r"
_tsvd_module = importlib.import_module("lowrank_kernels.ops.truncated_svd")
PERIOD = 5
LR, LMBDA, TARGET = 1e-3, 0.1, 0.2


@contextlib.contextmanager
def _env(var: str, value: str):
    old = os.environ.get(var)
    os.environ[var] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = old


@contextlib.contextmanager
def _attr(obj, name: str, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _param_set(blocks: int, d: int, dev, dtype):
    """``(model, {module: slices})``: the ViT-Tiny block linears, QKV split into 3 slices."""
    torch.manual_seed(0)
    layers = nn.ModuleList()
    tm = {}
    for _ in range(blocks):
        qkv, proj, fc1, fc2 = nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        layers.extend([qkv, proj, fc1, fc2])
        tm.update({qkv: [(0, d), (d, 2 * d), (2 * d, 3 * d)], proj: None, fc1: None, fc2: None})
    layers.to(dev, dtype)
    for p in layers.parameters():
        p.grad = 1e-2 * torch.randn_like(p)
    return layers, tm


class _SeedAdamQ3R:
    """The straightforward version: full SVD, dense L and R, G materialised, AdamW then ``p -= lr G``."""

    def __init__(self, model, tm, target_rank, lmbda, steps, lr):
        self.adamw = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        self.lmbda, self.steps, self.lr, self.t = lmbda, steps, lr, 0
        self.ops = []
        for module, slices in tm.items():
            w = module.weight
            for rows in slices or [(0, w.shape[0])]:
                m = rows[1] - rows[0]
                self.ops.append({"w": w, "rows": rows, "r": resolve_rank(target_rank, m, w.shape[1]),
                                 "eps": EPS_START, "L": None, "R": None})

    @torch.no_grad()
    def step(self):
        if self.t % self.steps == 0:
            for op in self.ops:
                X = op["w"][op["rows"][0]:op["rows"][1]].float()
                U, S, Vh = torch.linalg.svd(X, full_matrices=False)
                op["eps"] = min(op["eps"], float(S[op["r"]]))
                keep = S > op["eps"]
                d = (op["eps"] / S[keep]).clamp(max=1) - 1
                Uk, Vk = U[:, keep], Vh[keep].T
                op["L"] = torch.eye(X.shape[0], device=X.device) + Uk * d @ Uk.T
                op["R"] = torch.eye(X.shape[1], device=X.device) + Vk * d @ Vk.T
        self.t += 1
        grads: dict = {}
        for op in self.ops:
            X = op["w"][op["rows"][0]:op["rows"][1]].float()
            grads.setdefault(op["w"], []).append((op["rows"], 2 * self.lmbda * op["L"] @ X @ op["R"]))
        full = {w: ops.pad_slices([g for _, g in parts], [s for s, _ in parts], w.shape[0])
                for w, parts in grads.items()}
        self.adamw.step()
        for w, g in full.items():
            w.sub_(self.lr * g.to(w.dtype))


def _step_fn(provider: str, model, tm):
    if provider in ("adamw", "adamw_fused"):
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, fused=provider == "adamw_fused" or None)
    elif provider == "upstream":
        opt = _SeedAdamQ3R(model, tm, TARGET, LMBDA, PERIOD, LR)
    else:
        opt = AdamQ3R(model.parameters(), tm, target_rank=TARGET, lmbda=LMBDA, steps=PERIOD, lr=LR,
                      warm_start=not provider.endswith("+cold"))
    grads = [p.grad for p in model.parameters()]

    def period():
        for _ in range(PERIOD):
            torch._foreach_neg_(grads)
            opt.step()

    return period


def _with_backend(fn, provider: str):
    """``fn`` run with the dispatch the provider names (``triton...`` forces Triton, the rest the reference)."""
    value = provider.split("+")[0] if provider.startswith("triton") else "torch"

    def run():
        with _env(backend.ENV_VAR, value):
            fn()

    return run


def _update_fn(provider: str, tm):
    q = Q3R(tm, target_rank=TARGET, lmbda=LMBDA, steps=PERIOD, warm_start=provider == "warm_start")
    if provider == "torch_svd":
        def refresh():
            with _attr(_tsvd_module, "SMALL_DIM", 1 << 30):
                q.refresh()
    else:
        refresh = q.refresh
    return refresh


def run(quick: bool = True, device: str | None = None) -> list[dict]:
    """Rows for AdamQ3R vs AdamW vs the upstream algorithm (mode ``step``) and the rebuild (mode ``update``)."""
    dev = resolve_device(device)
    blocks, d = (2, 64) if quick else (12, 192)
    dtype = torch.float32
    step_providers = ["adamw", "adamw_fused", "torch", "torch+cold", "upstream"]
    step_providers += ["triton", "triton+cold"] if dev.type == "cuda" else []
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        # quick runs are smoke tests: one thread, because two on a busy 2-core box ran 10-100x slower
        torch.set_num_threads(int(os.environ.get("LOWRANK_BENCH_THREADS", "1" if quick else "2")))
    rep = 50 if quick else 1500
    config = {"blocks": blocks, "d": d, "steps": PERIOD, "target_rank": TARGET, "dtype": "float32",
              "threads": torch.get_num_threads() if dev.type == "cpu" else None}
    config = {k: v for k, v in config.items() if v is not None}
    rows = []
    try:
        # all step providers are timed together (interleaved on the CPU), each on its own copy of the weights
        fns = {}
        for provider in step_providers:
            model, tm = _param_set(blocks, d, dev, dtype)
            fns[provider] = _with_backend(_step_fn(provider, model, tm), provider)
            fns[provider]()
        for provider, times in time_interleaved(fns, dev, warmup=rep / 5, rep=rep).items():
            p50, p20, p80 = (t / PERIOD for t in times)
            rows.append(make_row(KERNEL, provider, "step", "time", "ms", "blocks", blocks, p50, p20, p80, config))
            # launches / syncs per step, amortised over one period (one rebuild + PERIOD steps)
            rows += cost_rows(KERNEL, provider, "step", fns[provider], "blocks", blocks, config, per=PERIOD)
        for provider in ("torch_svd", "truncated_svd", "warm_start"):
            model, tm = _param_set(blocks, d, dev, dtype)
            fn = _update_fn(provider, tm)
            fn()
            p50, p20, p80 = time_fn(fn, dev, warmup=rep / 5, rep=rep)
            rows.append(make_row(KERNEL, provider, "update", "time", "ms", "blocks", blocks, p50, p20, p80, config))
            rows += cost_rows(KERNEL, provider, "update", fn, "blocks", blocks, config)
    finally:
        torch.set_num_threads(threads)
    return rows


def ratios(rows: list[dict]) -> dict[str, float]:
    """Step time over AdamW's per provider, and full-SVD over truncated rebuild time."""
    t = {(r["mode"], r["provider"]): float(r["p50"]) for r in rows if r["metric"] == "time"}
    out = {f"{p}/{base}": t[("step", p)] / t[("step", base)] for m, p in t if m == "step" and not p.startswith("adamw")
           for base in ("adamw", "adamw_fused")}
    for p in ("truncated_svd", "warm_start"):
        out[f"svd speedup {p}"] = t[("update", "torch_svd")] / t[("update", p)]
    return out


if __name__ == "__main__":
    from bench.common import main

    rows = main(run)
    for name, value in ratios(rows).items():
        print(f"{name}: {value:.2f}x")
