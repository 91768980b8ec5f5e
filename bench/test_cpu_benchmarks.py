"""pytest-benchmark over the CPU paths of the public ops, against what a user would otherwise call.

Run with ``pytest bench --benchmark-only`` (``--benchmark-group-by=group`` is the default grouping).
Not part of the default test run (``testpaths`` is ``python_tests``). On a CPU the public ops take
their PyTorch path (or the C++ op), so this measures dispatch + reference cost against the
alternatives; the Triton kernels are measured on a GPU by ``python -m bench --full``.
An op that has not landed in ``lowrank_kernels.ops`` yet is skipped by name.
"""

import pytest
import torch

ops = pytest.importorskip("lowrank_kernels.ops")
torch.manual_seed(0)

M, K, N, R = 512, 768, 768, 16


def _op(name):
    fn = getattr(ops, name, None)
    if fn is None:
        pytest.skip(f"lowrank_kernels.ops.{name} not available")
    return fn


def _cases(group, cases):
    return pytest.mark.parametrize("provider", cases, ids=cases), pytest.mark.benchmark(group=group)


def _apply(marks):
    def deco(fn):
        for mark in marks:
            fn = mark(fn)
        return fn

    return deco


@_apply(_cases("lowrank_matmul forward", ["ours", "torch", "dense_linear"]))
def test_lowrank_matmul_forward(benchmark, provider):
    x, U, V = torch.randn(M, K), torch.randn(N, R), torch.randn(R, K)
    W = U @ V
    fns = {"ours": lambda: _op("lowrank_matmul")(x, U, V), "torch": lambda: (x @ V.T) @ U.T,
           "dense_linear": lambda: torch.nn.functional.linear(x, W)}
    fn = fns[provider]
    out = benchmark(fn)
    torch.testing.assert_close(out, x @ W.T, rtol=1e-3, atol=1e-2)


@_apply(_cases("lora_matmul forward", ["ours", "torch"]))
def test_lora_matmul_forward(benchmark, provider):
    x, W = torch.randn(M, K), torch.randn(N, K)
    A, B, scaling = torch.randn(R, K), torch.randn(N, R), 0.5
    fns = {"ours": lambda: _op("lora_matmul")(x, W, A, B, scaling),
           # what PEFT's LoraLayer does in eager mode: base linear plus a scaled adapter product
           "torch": lambda: torch.nn.functional.linear(x, W) + scaling * ((x @ A.T) @ B.T)}
    out = benchmark(fns[provider])
    torch.testing.assert_close(out, x @ W.T + scaling * (x @ A.T @ B.T), rtol=1e-3, atol=1e-2)


@_apply(_cases("spectral_norm of 8 matrices", ["ours", "matrix_norm"]))
def test_spectral_norm(benchmark, provider):
    mats = [torch.randn(256, 128) for _ in range(4)] + [torch.randn(96, 200) for _ in range(4)]
    fns = {"ours": lambda: _op("spectral_norm")(mats),
           "matrix_norm": lambda: torch.stack([torch.linalg.matrix_norm(m, ord=2) for m in mats])}
    out = benchmark(fns[provider])
    expected = torch.stack([torch.linalg.matrix_norm(m, ord=2) for m in mats])
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=1e-3)


@_apply(_cases("truncated_svd rank 16 of 768x768", ["ours", "torch_svd", "torch_svd_lowrank"]))
def test_truncated_svd(benchmark, provider):
    W = torch.randn(N, R) @ torch.randn(R, K) + 1e-3 * torch.randn(N, K)
    fns = {"ours": lambda: _op("truncated_svd")(W, R)[1],
           "torch_svd": lambda: torch.linalg.svdvals(W)[:R],
           "torch_svd_lowrank": lambda: torch.svd_lowrank(W, q=R + 8, niter=4)[1][:R]}
    S = benchmark(fns[provider])
    torch.testing.assert_close(S, torch.linalg.svdvals(W)[:R], rtol=1e-2, atol=1e-2)


@_apply(_cases("pad_slices 8 slices", ["ours", "torch"]))
def test_pad_slices(benchmark, provider):
    bounds = [(i * 96, i * 96 + 80) for i in range(8)]
    grads = [torch.randn(stop - start, K) for start, stop in bounds]

    def torch_pad():
        out = torch.zeros(8 * 96, K)
        for g, (start, stop) in zip(grads, bounds, strict=True):
            out[start:stop] = g
        return out

    fns = {"ours": lambda: _op("pad_slices")(grads, bounds, 8 * 96), "torch": torch_pad}
    out = benchmark(fns[provider])
    torch.testing.assert_close(out, torch_pad())
