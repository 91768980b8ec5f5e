"""ops.pad_slices / ops.gather_slices: the C++ op (CPU here, CUDA on the GPU machine) vs a
pure-Python reference, autograd both ways, torch.compile, and every bad input."""

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank_kernels import _ext, ops
from lowrank_kernels.ops.pad_slices import gather_slices_ref, pad_slices_ref
from lowrank_kernels.testing import assert_verbose_allclose

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
QKV = [(0, 4), (4, 8), (8, 12)]


def _python_pad(grads, slices, full_size, dim):
    """Element-by-element reference, independent of both implementations."""
    shape = list(grads[0].shape)
    shape[dim] = full_size
    out = torch.zeros(shape, dtype=grads[0].dtype)
    for g, (start, stop) in zip(grads, slices, strict=True):
        for k in range(stop - start):
            idx = [slice(None)] * len(shape)
            idx[dim] = start + k
            src = [slice(None)] * len(shape)
            src[dim] = k
            out[tuple(idx)] = g[tuple(src)].cpu()
    return out


def test_extension_loaded():
    assert _ext.HAS_EXT, f"lowrank_kernels._C did not load: {_ext.LOAD_ERROR}"
    assert hasattr(torch.ops.lowrank_kernels, "pad_slices")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_pad_matches_python_reference(dtype, dim, device):
    shape = [12, 5, 3]
    d = dim % 3
    sizes = [2, 3, 1]
    slices = [(0, 2), (4, 7), (11, 12)]
    grads = []
    for n in sizes:
        s = list(shape)
        s[d] = n
        grads.append(torch.randn(s, device=device).to(dtype))
    full = 12
    out = ops.pad_slices(grads, slices, full, dim=dim)
    expected = _python_pad(grads, slices, full, d)
    assert out.dtype == dtype and out.device.type == device
    assert_verbose_allclose(out.cpu(), expected, rtol=0, atol=0, name="pad")
    back = ops.gather_slices(out, slices, dim=dim)
    for g, b in zip(grads, back, strict=True):
        assert_verbose_allclose(b, g, rtol=0, atol=0, name="gather")


def test_extension_and_reference_agree(device, monkeypatch):
    grads = [torch.randn(4, 6, device=device), torch.randn(4, 6, device=device)]
    ext = ops.pad_slices(grads, [(0, 4), (8, 12)], 12)
    monkeypatch.setenv("LOWRANK_KERNELS_BACKEND", "torch")
    ref = ops.pad_slices(grads, [(0, 4), (8, 12)], 12)
    assert_verbose_allclose(ext, ref, rtol=0, atol=0)


def test_negative_indices_resolve():
    grads = [torch.ones(2, 3), torch.full((3, 3), 2.0)]
    out = ops.pad_slices(grads, [(0, 2), (-3, 10)], 10)
    assert out[7:10].eq(2).all() and out[2:7].eq(0).all()
    out2 = ops.pad_slices([torch.ones(1, 2)], [(-1, 10)], 10)
    assert out2[9].eq(1).all() and out2[:9].eq(0).all()


def test_non_contiguous_grads(device):
    base = torch.randn(6, 8, device=device)
    g = base.t()[:, :4]  # (8, 4), non-contiguous
    assert not g.is_contiguous()
    out = ops.pad_slices([g], [(2, 6)], 9, dim=1)
    assert_verbose_allclose(out[:, 2:6], g, rtol=0, atol=0)
    assert out[:, :2].abs().sum() == 0 and out[:, 6:].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_autograd_pad_and_gather(dtype):
    grads = [torch.randn(4, 3, dtype=dtype, requires_grad=True) for _ in range(3)]
    w = torch.randn(13, 3, dtype=dtype)
    (ops.pad_slices(grads, QKV, 13) * w).sum().backward()
    for g, (s, e) in zip(grads, QKV, strict=True):
        assert_verbose_allclose(g.grad, w[s:e], rtol=0, atol=0)
    full = torch.randn(13, 3, dtype=dtype, requires_grad=True)
    parts = ops.gather_slices(full, QKV)
    (parts[0].sum() * 2 + parts[2].sum()).backward()  # parts[1] unused: its grad is None
    expected = torch.zeros(13, 3, dtype=dtype)
    expected[0:4] = 2
    expected[8:12] = 1
    assert_verbose_allclose(full.grad, expected, rtol=0, atol=0)


def test_gradcheck_fp64():
    grads = tuple(torch.randn(2, n, dtype=torch.float64, requires_grad=True) for n in (2, 3))
    assert torch.autograd.gradcheck(lambda a, b: ops.pad_slices([a, b], [(1, 3), (4, 7)], 8, dim=1), grads)
    full = torch.randn(8, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f: tuple(ops.gather_slices(f, [(0, 3), (5, 8)])), (full,))


def test_torch_compile_fullgraph():
    def f(a, b, c):
        return ops.pad_slices([a, b, c], QKV, 12) * 2.0

    grads = [torch.randn(4, 5, requires_grad=True) for _ in range(3)]
    compiled = torch.compile(f, fullgraph=True)
    out = compiled(*grads)
    assert_verbose_allclose(out, f(*grads), rtol=0, atol=0)
    out.sum().backward()
    assert_verbose_allclose(grads[1].grad, torch.full((4, 5), 2.0), rtol=0, atol=0)

    g = torch.compile(lambda x: [p * 3 for p in ops.gather_slices(x, QKV)], fullgraph=True)
    x = torch.randn(12, 5)
    for p, (s, e) in zip(g(x), QKV, strict=True):
        assert_verbose_allclose(p, x[s:e] * 3, rtol=0, atol=0)


@pytest.mark.parametrize(
    "grads_shapes, slices, full, dim, exc, match",
    [
        ([(4, 3), (4, 3)], [(0, 4), (2, 6)], 8, 0, ValueError, "overlap"),
        ([(4, 3)], [(6, 10)], 8, 0, ValueError, "out of range"),
        ([(4, 3)], [(4, 0)], 8, 0, ValueError, "out of range|reversed"),
        ([(4, 3)], [(5, 3)], 8, 0, ValueError, "reversed"),
        ([(4, 3)], [(-12, -8)], 8, 0, ValueError, "out of range"),
        ([(4, 3)], [(0, 3)], 8, 0, ValueError, "size 4 along dim 0"),
        ([(4, 3), (4, 2)], [(0, 4), (4, 8)], 8, 0, ValueError, "along dim 1"),
        ([(4, 3)], [(0, 4)], 8, 2, ValueError, "out of range"),
        ([(4, 3)], [(0, 4), (4, 8)], 8, 0, ValueError, "2 slices for 1"),
        ([(4, 3)], [(0, 4)], 0, 0, ValueError, "positive"),
        ([(4, 3)], [(0.0, 4)], 8, 0, ValueError, "pair of ints"),
        ([(4, 3)], [(0, 1, 4)], 8, 0, ValueError, "pair of ints"),
        ([(4, 3), (4, 3, 1)], [(0, 4), (4, 8)], 8, 0, ValueError, "shape"),
    ],
)
def test_bad_input_raises_before_writing(grads_shapes, slices, full, dim, exc, match):
    grads = [torch.randn(s) for s in grads_shapes]
    with pytest.raises(exc, match=match):
        ops.pad_slices(grads, slices, full, dim=dim)


def test_dtype_device_and_type_errors():
    with pytest.raises(TypeError, match="dtype"):
        ops.pad_slices([torch.randn(2, 2), torch.randn(2, 2, dtype=torch.float64)], [(0, 2), (2, 4)], 4)
    with pytest.raises(TypeError, match="floating-point"):
        ops.pad_slices([torch.ones(2, 2, dtype=torch.int64)], [(0, 2)], 4)
    with pytest.raises(TypeError, match="list"):
        ops.pad_slices(torch.randn(2, 2), [(0, 2)], 4)
    with pytest.raises(ValueError, match="empty"):
        ops.pad_slices([], [], 4)
    with pytest.raises(ValueError, match="overlap"):
        ops.gather_slices(torch.randn(8, 2), [(0, 5), (4, 8)])
    with pytest.raises(ValueError, match="out of range"):
        ops.gather_slices(torch.randn(8, 2), [(0, 9)])


_CPP_CHECKS = """
import torch, lowrank_kernels
op = torch.ops.lowrank_kernels.pad_slices
cases = [
    ("overlap", ValueError, lambda: op([torch.ones(4, 2), torch.ones(4, 2)], [0, 2], [4, 6], 8, 0)),
    ("outside", ValueError, lambda: op([torch.ones(4, 2)], [6], [10], 8, 0)),
    ("dtype", TypeError, lambda: op([torch.ones(4, 2), torch.ones(4, 2, dtype=torch.float64)], [0, 4], [4, 8], 8, 0)),
    ("size 3 along dim 0", ValueError, lambda: op([torch.ones(3, 2)], [0], [4], 8, 0)),
    ("out of range", ValueError, lambda: op([torch.ones(4, 2)], [0], [4], 8, 5)),
    ("outside", ValueError, lambda: torch.ops.lowrank_kernels.gather_slices(torch.ones(8, 2), [0], [9], 0)),
]
for want, kind, call in cases:
    try:
        call()
    except (RuntimeError, ValueError, TypeError) as exc:
        assert want in str(exc), (want, str(exc))
        assert type(exc) is kind, (want, type(exc).__name__)  # TORCH_CHECK_VALUE / TORCH_CHECK_TYPE
        print("raised:", want)
    else:
        raise AssertionError("no error for " + want)
"""


def test_cpp_op_checks_directly():
    """The C++ op validates on its own (ValueError for slices and shapes, TypeError for dtype and device, as
    the Python API), for callers that bypass the Python wrapper.

    Run in a subprocess: should a TORCH_CHECK failure crash the process (as it did on one GPU image,
    see README), this test fails instead of taking the whole test session down.
    """
    res = subprocess.run([sys.executable, "-c", _CPP_CHECKS], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"exit code {res.returncode}\n{res.stdout}\n{res.stderr[-2000:]}"
    assert res.stdout.count("raised:") == 6


@st.composite
def _pad_cases(draw):
    ndim = draw(st.integers(1, 3))
    dim = draw(st.integers(0, ndim - 1))
    full = draw(st.integers(1, 24))
    cuts = sorted(set(draw(st.lists(st.integers(0, full), min_size=2, max_size=8))))
    pairs = [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]
    if not pairs:
        pairs = [(0, full)]
    keep = draw(st.lists(st.booleans(), min_size=len(pairs), max_size=len(pairs)))
    chosen = [p for p, k in zip(pairs, keep, strict=False) if k] or pairs[:1]
    order = draw(st.permutations(chosen))
    other = [draw(st.integers(1, 4)) for _ in range(ndim)]
    dtype = draw(st.sampled_from(DTYPES))
    return ndim, dim, full, list(order), other, dtype


@settings(max_examples=60, deadline=None)
@given(_pad_cases())
def test_property_pad_gather_round_trip(case):
    ndim, dim, full, slices, other, dtype = case
    grads = []
    for start, stop in slices:
        shape = list(other)
        shape[dim] = stop - start
        grads.append(torch.randn(shape).to(dtype))
    out = ops.pad_slices(grads, slices, full, dim=dim)
    assert_verbose_allclose(out, _python_pad(grads, slices, full, dim), rtol=0, atol=0)
    assert_verbose_allclose(out, pad_slices_ref(grads, slices, full, dim), rtol=0, atol=0)
    gathered = ops.gather_slices(out, slices, dim=dim)
    for g, b, r in zip(grads, gathered, gather_slices_ref(out, slices, dim), strict=True):
        assert_verbose_allclose(b, g, rtol=0, atol=0)
        assert_verbose_allclose(r, g, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernel_matches_cpu(dtype):
    assert _ext.HAS_CUDA_EXT, f"CUDA kernel not built: {_ext.LOAD_ERROR}"
    grads_cpu = [torch.randn(64, 33).to(dtype), torch.randn(40, 33).to(dtype), torch.randn(1, 33).to(dtype)]
    slices = [(0, 64), (100, 140), (-1, 300)]
    out_cpu = ops.pad_slices(grads_cpu, slices, 300)
    out_gpu = ops.pad_slices([g.cuda() for g in grads_cpu], slices, 300)
    assert_verbose_allclose(out_gpu.cpu(), out_cpu, rtol=0, atol=0)
    big = [torch.randn(8, 4096, 96, device="cuda", dtype=dtype) for _ in range(3)]
    out = ops.pad_slices(big, [(0, 4096), (4096, 8192), (8192, 12288)], 12288, dim=1)
    assert_verbose_allclose(out[:, 4096:8192].cpu(), big[1].cpu(), rtol=0, atol=0)
