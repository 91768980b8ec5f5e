"""ops.lora_matmul: the composed default and Triton (interpreted on CPU, compiled on GPU) against the PyTorch
reference; the dispatch between them."""

import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lowrank_kernels import backend, ops
from lowrank_kernels.ops.lora_matmul import lora_matmul_ref
from lowrank_kernels.testing import assert_close_to_reference, count_gpu_cost

lora_mod = importlib.import_module("lowrank_kernels.ops.lora_matmul")  # the module (ops.lora_matmul is the function)

NAMES = ("x", "W", "A", "B", "bias")


def _inputs(lead, in_f, out_f, r, dtype, device, bias=True, w_grad=False, noncontig=False):
    """Inputs scaled so that y and every gradient are O(1): absolute tolerances mean the same everywhere."""
    g = torch.Generator().manual_seed(1234)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    if noncontig:  # a transposed view: x.stride(-1) != 1 and no reshape-free 2-D view
        x = rnd(in_f, *lead).movedim(0, -1)
    else:
        x = rnd(*lead, in_f)
    W = rnd(out_f, in_f, scale=in_f ** -0.5)
    A = rnd(r, in_f, scale=in_f ** -0.5)
    B = rnd(out_f, r, scale=r ** -0.5)
    b = rnd(out_f) if bias else None
    x.requires_grad_(True)
    W.requires_grad_(w_grad)
    A.requires_grad_(True)
    B.requires_grad_(True)
    if b is not None:
        b.requires_grad_(True)
    return x, W, A, B, b


def _run(fn, tensors, scaling, dy):
    """Output and {name: grad} of every input that requires grad."""
    y = fn(*tensors[:4], scaling, tensors[4])
    named = [(n, t) for n, t in zip(NAMES, tensors, strict=True) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(y, [t for _, t in named], dy)
    return y, dict(zip([n for n, _ in named], grads, strict=True))


def _upcast(tensors):
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


def _check_against_reference(tensors, scaling, atol):
    dy = torch.randn(*tensors[0].shape[:-1], tensors[1].shape[0], dtype=torch.float64, device=tensors[0].device)
    y, grads = _run(ops.lora_matmul, tensors, scaling, dy.to(tensors[0]))
    y64, grads64 = _run(lora_matmul_ref, _upcast(tensors), scaling, dy)
    y_lp, grads_lp = _run(lora_matmul_ref, tensors, scaling, dy.to(tensors[0]))
    assert y.shape == y64.shape and y.dtype == tensors[0].dtype
    assert_close_to_reference(y, y64, y_lp, name="y", atol=atol)
    assert set(grads) == set(grads64)
    for name in grads64:
        assert grads[name].shape == grads64[name].shape
        assert_close_to_reference(grads[name], grads64[name], grads_lp[name], name=f"d{name}", atol=atol)
    return grads


# (leading dims, in, out, r, non-contiguous x): sizes off the 32-blocks; r=40 takes the unfused-t path.
SHAPES = [
    ((37,), 70, 45, 5, False),
    ((2, 9), 33, 17, 40, True),
    ((3,), 16, 16, 1, False),
    ((1, 5, 4), 48, 35, 16, True),
]
DTYPES = [(torch.float32, 1e-5), (torch.float16, 5e-3)]


@pytest.mark.parametrize("bias, w_grad", [(True, True), (False, False)])
@pytest.mark.parametrize("dtype, atol", DTYPES)
@pytest.mark.parametrize("lead, in_f, out_f, r, noncontig", SHAPES)
def test_matches_reference(triton_backend, device, lead, in_f, out_f, r, noncontig, dtype, atol, bias, w_grad):
    tensors = _inputs(lead, in_f, out_f, r, dtype, device, bias=bias, w_grad=w_grad, noncontig=noncontig)
    assert tensors[0].is_contiguous() != noncontig
    grads = _check_against_reference(tensors, 0.75, atol)
    assert ("W" in grads) == w_grad


@pytest.mark.parametrize("r", [3, 40])
def test_input_without_grad(triton_backend, device, r):
    """First layer: no dx kernel, u = dy B comes from a plain matmul; W, bias frozen, no bias."""
    x, W, A, B, _ = _inputs((29,), 36, 21, r, torch.float32, device, bias=False)
    x.requires_grad_(False)
    grads = _check_against_reference((x, W, A, B, None), 0.5, 1e-5)
    assert set(grads) == {"A", "B"}


def test_large_rank_256(triton_backend, device):
    """r = 256 > in: the unfused path streams t in several chunks."""
    _check_against_reference(_inputs((20,), 24, 19, 256, torch.float32, device, w_grad=True), 0.5, 1e-5)


def test_empty_batch(triton_backend, device):
    x, W, A, B, b = _inputs((0,), 24, 19, 4, torch.float32, device, w_grad=True)
    y = ops.lora_matmul(x, W, A, B, 2.0, b)
    assert y.shape == (0, 19)
    y.sum().backward()
    assert x.grad.shape == x.shape and float(B.grad.abs().sum()) == 0.0 and float(W.grad.abs().sum()) == 0.0


class _RecordMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.shapes.append(tuple(out.shape))
        return out


@pytest.fixture
def auto_backend(monkeypatch):
    monkeypatch.delenv("LOWRANK_KERNELS_BACKEND", raising=False)
    return "auto"


@pytest.mark.parametrize("backend_fixture", ["auto_backend", "triton_backend", "torch_backend"])
def test_frozen_W_gets_no_dW_work(backend_fixture, request, device):
    request.getfixturevalue(backend_fixture)
    x, W, A, B, b = _inputs((33,), 40, 24, 8, torch.float32, device, w_grad=False)
    y = ops.lora_matmul(x, W, A, B, 1.0, b)
    with _RecordMatmuls() as rec:
        y.backward(torch.ones_like(y))
    assert W.grad is None
    assert tuple(W.shape) not in rec.shapes, f"a dW-shaped matmul ran in the backward: {rec.shapes}"
    assert x.grad is not None and A.grad is not None and B.grad is not None and b.grad is not None


def test_torch_backend_is_the_reference(torch_backend, device):
    x, W, A, B, b = _inputs((5, 3), 20, 12, 3, torch.float32, device)
    torch.testing.assert_close(ops.lora_matmul(x, W, A, B, 0.3, b), lora_matmul_ref(x, W, A, B, 0.3, b),
                               rtol=0, atol=0)


@pytest.mark.parametrize("path", ["triton_backend", "composed_calls"])
def test_torch_compile_fullgraph(path, device, request):
    """Both paths (the Triton custom op's fake and autograd, the composed autograd Function) let dynamo +
    AOTAutograd trace forward and backward in one graph."""
    request.getfixturevalue(path)
    tensors = _inputs((2, 7), 40, 24, 5, torch.float32, device, w_grad=True)
    compiled = torch.compile(ops.lora_matmul, fullgraph=True, backend="aot_eager")
    dy = torch.randn(2, 7, 24, device=device)
    y, grads = _run(compiled, tensors, 0.5, dy)
    y_ref, grads_ref = _run(lora_matmul_ref, tensors, 0.5, dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-5, msg=name)


def _bad(**changes):
    x, W, A, B, b = (t.detach() for t in _inputs((4,), 8, 6, 2, torch.float32, "cpu"))
    args = dict(x=x, W=W, A=A, B=B, scaling=1.0, bias=b)
    args.update(changes)
    return args


BAD = [
    (dict(x=torch.randn(4, 9)), ValueError, "input features"),
    (dict(W=torch.randn(6, 8, 1)), ValueError, "W must be 2-D"),
    (dict(A=torch.randn(2, 7)), ValueError, r"A must be \(r, in=8\)"),
    (dict(A=torch.randn(0, 8)), ValueError, "rank >= 1"),
    (dict(B=torch.randn(6, 3)), ValueError, r"B must be \(out=6, r=2\)"),
    (dict(bias=torch.randn(5)), ValueError, r"bias must be \(out=6,\)"),
    (dict(scaling=float("nan")), ValueError, "scaling must be finite"),
    (dict(scaling=torch.tensor(1.0)), TypeError, "scaling must be a Python float"),
    (dict(x=torch.randn(4, 8, dtype=torch.float16)), TypeError, "dtype"),
    (dict(x=torch.ones(4, 8, dtype=torch.int64)), TypeError, "floating-point"),
    (dict(B=[[1.0]]), TypeError, "B must be a torch.Tensor"),
]


@pytest.mark.parametrize("changes, exc, match", BAD)
def test_bad_input(triton_backend, changes, exc, match):
    with pytest.raises(exc, match=match):
        ops.lora_matmul(**_bad(**changes))


@pytest.mark.parametrize("backend_fixture", ["auto_backend", "triton_backend"])
def test_1d_input_and_broadcast_grad(backend_fixture, request, device):
    """x of shape (in,), and y.sum().backward() whose dy is an expanded (stride-0) tensor."""
    request.getfixturevalue(backend_fixture)
    x, W, A, B, b = _inputs((), 50, 30, 4, torch.float32, device, w_grad=True)
    y = ops.lora_matmul(x, W, A, B, 1.5, b)
    assert y.shape == (30,)
    y.sum().backward()
    grads = [t.grad.clone() for t in (x, W, A, B, b)]
    for t in (x, W, A, B, b):
        t.grad = None
    y_ref = lora_matmul_ref(x, W, A, B, 1.5, b)
    y_ref.sum().backward()
    torch.testing.assert_close(y, y_ref)
    for name, g, t in zip(NAMES, grads, (x, W, A, B, b), strict=True):
        torch.testing.assert_close(g, t.grad, msg=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_reference_dtypes_on_cpu(triton_backend, dtype):
    """fp64, and bf16 on the CPU (the interpreter's bf16 tl.dot is wrong), answer with the reference."""
    x, W, A, B, b = _inputs((6,), 20, 12, 3, dtype, "cpu", w_grad=True)
    torch.testing.assert_close(ops.lora_matmul(x, W, A, B, 0.3, b), lora_matmul_ref(x, W, A, B, 0.3, b))


# ------------------------------------------------------------------------------- composed (default) path
@pytest.fixture
def composed_calls(monkeypatch):
    """Records the calls that reached the composed implementation (the default dispatch unless a backend
    fixture forces another)."""
    calls = []
    real = lora_mod.lora_matmul_composed

    def spy(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return real(*args, **kwargs)

    monkeypatch.setattr(lora_mod, "lora_matmul_composed", spy)
    return calls


@pytest.mark.parametrize("bias, w_grad", [(True, True), (False, False)])
@pytest.mark.parametrize("dtype, atol", DTYPES + [(torch.bfloat16, 3e-2), (torch.float64, 1e-10)])
@pytest.mark.parametrize("lead, in_f, out_f, r, noncontig", SHAPES)
def test_composed_matches_reference(composed_calls, device, lead, in_f, out_f, r, noncontig, dtype, atol, bias,
                                    w_grad):
    tensors = _inputs(lead, in_f, out_f, r, dtype, device, bias=bias, w_grad=w_grad, noncontig=noncontig)
    grads = _check_against_reference(tensors, 0.75, atol)
    assert ("W" in grads) == w_grad
    assert composed_calls == [tuple(tensors[0].shape)]


def test_composed_is_the_default_on_every_device(monkeypatch, device):
    monkeypatch.delenv("LOWRANK_KERNELS_BACKEND", raising=False)
    x, W, A, B, b = _inputs((8,), 20, 12, 3, torch.float32, device)
    cls = backend.shape_class(8, 20, 12, 3)
    assert backend.pick("lora_matmul", x, W, A, B, b, shape=cls) == "composed"
    monkeypatch.setitem(backend.TABLE, backend.table_key("lora_matmul", "cuda", torch.float32, cls), "triton")
    expected = "triton" if device == "cuda" else "composed"  # the table is for CUDA tensors only
    assert backend.pick("lora_matmul", x, W, A, B, b, shape=cls) == expected


@pytest.mark.parametrize("need", ["x", "A", "B", "xAB"])
def test_composed_computes_only_requested_grads(composed_calls, device, need):
    x, W, A, B, b = _inputs((17,), 24, 20, 4, torch.float32, device, bias=True)
    for name, t in zip("xAB", (x, A, B), strict=True):
        t.requires_grad_(name in need)
    b.requires_grad_(False)
    y = ops.lora_matmul(x, W, A, B, 0.5, b)
    dy = torch.randn_like(y)
    with count_gpu_cost() as cost:
        y.backward(dy)
    ref = [t.detach().clone().requires_grad_(t.requires_grad) for t in (x, W, A, B)]
    lora_matmul_ref(*ref, 0.5, b).backward(dy)
    for name, t, r in zip("xWAB", (x, W, A, B), ref, strict=True):
        if name in need:
            torch.testing.assert_close(t.grad, r.grad, rtol=1e-5, atol=1e-5, msg=name)
        else:
            assert t.grad is None, name
    # u = dy B (if x or A), dx = dy W + addmm_ (if x), dA (if A), dB (if B): nothing else
    expected = ("x" in need or "A" in need) + 2 * ("x" in need) + ("A" in need) + ("B" in need)
    assert cost.launches == expected, cost.ops


def test_composed_dropout_draws_one_mask(composed_calls, device):
    x, W, A, B, b = _inputs((3, 11), 30, 20, 5, torch.float32, device, w_grad=True)
    dy = torch.randn(3, 11, 20, device=device)
    torch.manual_seed(11)
    y, grads = _run(lambda *a: ops.lora_matmul(*a, dropout=0.4), (x, W, A, B, b), 1.5, dy)
    torch.manual_seed(11)
    y_ref, grads_ref = _run(lambda *a: lora_matmul_ref(*a, dropout=0.4), (x, W, A, B, b), 1.5, dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-5, msg=name)
    y0 = ops.lora_matmul(x, W, A, B, 1.5, b)
    assert not torch.allclose(y, y0)  # the dropout did something


@pytest.mark.parametrize("p", [-0.1, 1.0, float("nan"), True])
def test_bad_dropout(p):
    with pytest.raises(ValueError, match="dropout"):
        ops.lora_matmul(**_bad(), dropout=p)


def test_triton_forced_takes_composed_for_fp64_and_dropout(triton_backend, composed_calls, device):
    x, W, A, B, b = _inputs((6,), 20, 12, 3, torch.float32, device)
    ops.lora_matmul(x, W, A, B, 0.3, b)
    assert composed_calls == []  # Triton served it
    ops.lora_matmul(x, W, A, B, 0.3, b, dropout=0.2)
    ops.lora_matmul(*(t.double() for t in (x, W, A, B)), 0.3, b.double())
    assert len(composed_calls) == 2


# --------------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("r", [1, 16, 64, 100, 256])
@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3), (torch.float32, 1e-4)])
def test_gpu_matches_reference(triton_backend, r, dtype, atol):
    tensors = _inputs((3, 97), 320, 264, r, dtype, "cuda", w_grad=True, noncontig=r == 64)
    _check_against_reference(tensors, 2.0, atol)


@pytest.mark.gpu
def test_gpu_bf16_frozen_base_and_compile(triton_backend):
    tensors = _inputs((257,), 512, 384, 32, torch.bfloat16, "cuda", bias=True, w_grad=False)
    grads = _check_against_reference(tensors, 0.5, 2e-2)
    assert "W" not in grads
    compiled = torch.compile(ops.lora_matmul, fullgraph=True)
    dy = torch.randn(257, 384, device="cuda", dtype=torch.bfloat16)
    y, g = _run(compiled, tensors, 0.5, dy)
    y_ref, g_ref = _run(ops.lora_matmul, tensors, 0.5, dy)
    torch.testing.assert_close(y, y_ref)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("r", [16, 64])
def test_gpu_autotuned_large(triton_backend, r):
    """M * N * K >= AUTOTUNE_MIN_WORK takes the autotuned launch (forward and the dx kernel)."""
    from lowrank_kernels.kernels.lora_matmul import AUTOTUNE_MIN_WORK

    m, k, n = 4096, 1024, 1024
    assert m * k * n >= AUTOTUNE_MIN_WORK
    _check_against_reference(_inputs((m,), k, n, r, torch.bfloat16, "cuda", w_grad=False), 2.0, 2e-2)
