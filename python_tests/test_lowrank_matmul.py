"""ops.lowrank_matmul: the composed default and Triton (interpreted on CPU, compiled on GPU) against the PyTorch
reference; the dispatch between them."""

import pytest
import torch

from lowrank_kernels import backend
from lowrank_kernels.ops import lowrank_matmul, lowrank_matmul_ref
from lowrank_kernels.testing import assert_close_to_reference, assert_verbose_allclose, count_gpu_cost

NAMES = ("y", "dx", "dU", "dV", "dbias")


def _inputs(lead, in_f, out_f, r, dtype, device, bias=True, noncontig=False):
    if noncontig:  # every other column of a wider buffer, then a transpose of the leading dims
        x = torch.randn(*lead[::-1], 2 * in_f, device=device)[..., ::2].transpose(0, -2)
        assert not x.is_contiguous()
    else:
        x = torch.randn(*lead, in_f, device=device)
    U = torch.randn(out_f, r, device=device) / r**0.5
    V = torch.randn(r, in_f, device=device) / in_f**0.5
    b = torch.randn(out_f, device=device) if bias else None
    return [t.to(dtype) if t is not None else None for t in (x, U, V, b)]


def _run(fn, x, U, V, b, dy):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, U, V, b)]
    y = fn(*leaves)
    y.backward(dy.to(y.dtype))
    return [y] + [t.grad if t is not None else None for t in leaves]


def _check_against_reference(x, U, V, b, atol_scale=1e-5):
    dy = torch.randn(*x.shape[:-1], U.shape[0], device=x.device, dtype=x.dtype)
    got = _run(lowrank_matmul, x, U, V, b, dy)
    same = _run(lowrank_matmul_ref, x, U, V, b, dy)
    exact = _run(lambda *a: lowrank_matmul_ref(*a, upcast=True), x, U, V, b, dy)
    assert got[0].dtype == x.dtype and got[0].shape == (*x.shape[:-1], U.shape[0])
    for name, g, s, e in zip(NAMES, got, same, exact, strict=True):
        if e is None:
            assert g is None, name
            continue
        assert g.shape == e.shape and g.dtype == x.dtype, name
        assert_close_to_reference(g, e, s, name=name, atol=atol_scale * max(1.0, e.abs().max().item()))


CASES = [  # (leading dims, in, out, r, bias): awkward sizes, r = 1, 5, 40
    ((37,), 45, 29, 5, True),
    ((2, 9), 33, 50, 40, False),
    ((19,), 17, 18, 1, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lead, in_f, out_f, r, bias", CASES)
def test_triton_matches_reference(triton_backend, device, lead, in_f, out_f, r, bias, dtype):
    _check_against_reference(*_inputs(lead, in_f, out_f, r, dtype, device, bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_noncontiguous_3d_input(triton_backend, device, dtype):
    _check_against_reference(*_inputs((3, 7), 21, 26, 6, dtype, device, noncontig=True))


@pytest.mark.parametrize("fuse", [True, False])
def test_triton_backward_with_and_without_fused_weight_grads(triton_backend, device, fuse):
    from lowrank_kernels.kernels.lowrank_matmul import lowrank_matmul_backward

    x, U, V, _ = _inputs((45,), 37, 29, 24, torch.float32, device)
    dy = torch.randn(45, 29, device=device)
    t = x @ V.t()
    s, dx, dbias, dU, dV = lowrank_matmul_backward(dy, x, U, V, t, fuse_grads=fuse)
    assert_verbose_allclose(s, dy @ U, atol=1e-4, rtol=1e-4, name="s")
    assert_verbose_allclose(dx, dy @ U @ V, atol=1e-4, rtol=1e-4, name="dx")
    assert_verbose_allclose(dbias, dy.sum(0), atol=1e-4, rtol=1e-4, name="dbias")
    if fuse:
        assert_verbose_allclose(dU, dy.t() @ t, atol=1e-4, rtol=1e-4, name="dU")
        assert_verbose_allclose(dV, (dy @ U).t() @ x, atol=1e-4, rtol=1e-4, name="dV")
    else:
        assert dU is None and dV is None


def test_triton_1d_input_and_broadcast_grad(triton_backend, device):
    x, U, V, b = _inputs((), 20, 17, 3, torch.float32, device)
    x.requires_grad_(True)
    y = lowrank_matmul(x, U, V, b)
    assert y.shape == (17,)
    assert_verbose_allclose(y, lowrank_matmul_ref(x, U, V, b), atol=1e-5)
    y.sum().backward()  # dy is an expanded (stride-0) tensor
    assert_verbose_allclose(x.grad, U.sum(0) @ V, atol=1e-5, name="dx")


@pytest.mark.parametrize("trainable", ["U", "UVb", "xV"])
def test_triton_only_requested_grads(triton_backend, device, trainable):
    # "UVb" is a layer on frozen input (no dx) with r small enough for the fused dU/dV path
    x, U, V, b = _inputs((11,), 20, 17, 3, torch.float32, device)
    named = {"x": x, "U": U, "V": V, "b": b}
    for key in trainable:
        named[key].requires_grad_(True)
    lowrank_matmul(x, U, V, b).square().sum().backward()
    refs = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in named.items()}
    lowrank_matmul_ref(refs["x"], refs["U"], refs["V"], refs["b"]).square().sum().backward()
    for key, t in named.items():
        if key in trainable:
            assert_verbose_allclose(t.grad, refs[key].grad, atol=1e-4, rtol=1e-5, name=f"d{key}")
        else:
            assert t.grad is None, key


def test_fallbacks_fp64_and_large_rank(triton_backend, device):
    for dtype, r in ((torch.float64, 4), (torch.float32, 257)):
        x, U, V, b = _inputs((5,), 8, 9, r, dtype, device)
        assert_verbose_allclose(lowrank_matmul(x, U, V, b), lowrank_matmul_ref(x, U, V, b), atol=1e-5)


@pytest.mark.parametrize("which", ["triton", "torch"])
def test_autocast_casts_like_linear(monkeypatch, device, which):
    if which == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("LOWRANK_KERNELS_BACKEND", which)
    x, U, V, b = _inputs((6,), 20, 17, 3, torch.float32, device)
    U.requires_grad_(True)
    with torch.autocast(device_type=device, dtype=torch.float16):
        y = lowrank_matmul(x, U, V, b)
    assert y.dtype == torch.float16
    ref = lowrank_matmul_ref(*(t.half() for t in (x, U, V, b)))
    assert_verbose_allclose(y, ref, atol=2e-2, rtol=1e-2)
    y.float().sum().backward()
    assert U.grad.dtype == torch.float32 and U.grad.shape == U.shape


# ------------------------------------------------------------------------------- composed (default) path
@pytest.fixture
def custom_op_calls(monkeypatch):
    """Counts calls of the Triton custom op (whatever the backend)."""
    calls = []
    real = torch.ops.lowrank_kernels.lowrank_matmul

    class Spy:
        def __call__(self, *args):
            calls.append(tuple(args[0].shape))
            return real(*args)

    monkeypatch.setattr(torch.ops.lowrank_kernels, "lowrank_matmul", Spy())
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("lead, in_f, out_f, r, bias", CASES)
def test_composed_default_matches_reference(monkeypatch, custom_op_calls, device, lead, in_f, out_f, r, bias, dtype):
    monkeypatch.delenv("LOWRANK_KERNELS_BACKEND", raising=False)
    _check_against_reference(*_inputs(lead, in_f, out_f, r, dtype, device, bias))
    assert custom_op_calls == []


def test_composed_allocates_one_activation_each_way(monkeypatch, device):
    """Forward: exactly one (M, out) tensor and 2 launches; backward: exactly one (M, in) tensor."""
    monkeypatch.delenv("LOWRANK_KERNELS_BACKEND", raising=False)
    m, in_f, out_f, r = 96, 40, 56, 4
    x, U, V, b = (t.requires_grad_(True) for t in _inputs((m,), in_f, out_f, r, torch.float32, device))
    with count_gpu_cost(min_numel=m * in_f) as fwd:
        y = lowrank_matmul(x, U, V, b)
    dy = torch.randn_like(y)
    with count_gpu_cost(min_numel=m * in_f) as bwd:
        y.backward(dy)
    assert [s for _, s in fwd.large] == [(m, out_f)] and fwd.launches == 2, fwd.ops
    assert [s for _, s in bwd.large] == [(m, in_f)] and bwd.launches == 5, bwd.ops
    assert fwd.syncs == bwd.syncs == 0


def test_pick_default_and_table(monkeypatch, device):
    monkeypatch.delenv("LOWRANK_KERNELS_BACKEND", raising=False)
    x, U, V, b = _inputs((8,), 20, 12, 3, torch.float32, device)
    cls = backend.shape_class(8, 20, 12, 3)
    assert cls == "small-r16" and backend.shape_class(8192, 4096, 4096, 64) == "large-r64"
    assert backend.shape_class(10, 10, 10, 300) == "small-rgt256"
    assert backend.pick("lowrank_matmul", x, U, V, b, shape=cls) == "composed"
    monkeypatch.setitem(backend.TABLE, backend.table_key("lowrank_matmul", "cuda", torch.float32, cls), "triton")
    assert backend.pick("lowrank_matmul", x, U, V, b, shape=cls) == ("triton" if device == "cuda" else "composed")
    monkeypatch.setenv("LOWRANK_KERNELS_BACKEND", "torch")
    assert backend.pick("lowrank_matmul", x, U, V, b, shape=cls) == "torch"
    with pytest.raises(ValueError, match="no composed implementation"):
        backend.pick("spectral_norm", x)


@pytest.mark.parametrize("interpret", ["1", "0"])
def test_triton_forced_bf16_on_cpu_is_the_reference(triton_backend, custom_op_calls, monkeypatch, interpret):
    """The interpreter's bf16 tl.dot is wrong (errors ~1e9): forced Triton on bf16 CPU tensors must answer with
    the reference, with or without the interpreter, and never reach the kernel."""
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    x, U, V, b = _inputs((37,), 45, 29, 5, torch.bfloat16, "cpu")
    y = lowrank_matmul(x, U, V, b)
    assert custom_op_calls == []
    assert torch.equal(y, lowrank_matmul_ref(x, U, V, b))
    assert backend.pick("lowrank_matmul", x, U, V, b) == "torch"
    assert backend.pick("lora_matmul", x, U, V, b) == "torch"
    if interpret == "1":  # fp16 on the interpreter is right: it still reaches the kernel
        _check_against_reference(*_inputs((37,), 45, 29, 5, torch.float16, "cpu"))
        assert custom_op_calls == [(37, 45)]


def test_torch_backend_is_reference(torch_backend, device):
    _check_against_reference(*_inputs((4, 5), 12, 10, 3, torch.float32, device))


def test_custom_ops_pass_opcheck(triton_backend, device):
    x, U, V, b = _inputs((2, 5), 20, 24, 5, torch.float32, device)
    x, U, V, b = (t.requires_grad_(True) for t in (x, U, V, b))
    torch.library.opcheck(torch.ops.lowrank_kernels.lowrank_matmul.default, (x, U, V, b))
    y, t = torch.ops.lowrank_kernels.lowrank_matmul(x.detach(), U.detach(), V.detach(), b.detach())
    args = (torch.randn_like(y), x.detach(), U.detach(), V.detach(), t, True, True, True, True)
    # the backward op is only called from autograd: its schema and fake are what compile relies on
    torch.library.opcheck(torch.ops.lowrank_kernels.lowrank_matmul_backward.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph(triton_backend, device):
    x, U, V, b = (t.requires_grad_(True) for t in _inputs((2, 7), 20, 24, 5, torch.float32, device))
    fn = torch.compile(lambda *a: lowrank_matmul(*a).sin().sum(), fullgraph=True)
    fn(x, U, V, b).backward()
    got = [t.grad.clone() for t in (x, U, V, b)]
    for t in (x, U, V, b):
        t.grad = None
    lowrank_matmul_ref(x, U, V, b).sin().sum().backward()
    for name, g, t in zip(NAMES[1:], got, (x, U, V, b), strict=True):
        assert_verbose_allclose(g, t.grad, atol=1e-4, rtol=1e-4, name=name)


@pytest.mark.parametrize("case, exc, match", [
    ("in_mismatch", ValueError, "in_features=7"),
    ("rank_mismatch", ValueError, "ranks differ"),
    ("bias_shape", ValueError, "bias has shape"),
    ("dtype_mismatch", TypeError, "dtype"),
    ("device_mismatch", TypeError, "meta"),
    ("int_tensor", TypeError, "floating-point"),
    ("not_tensor", TypeError, "torch.Tensor"),
    ("U_1d", ValueError, "U must be 2-D"),
    ("rank_zero", ValueError, "rank must be >= 1"),
])
def test_bad_inputs_raise(triton_backend, case, exc, match):
    x, U, V, b = torch.randn(3, 6), torch.randn(5, 2), torch.randn(2, 6), torch.randn(5)
    args = {
        "in_mismatch": (torch.randn(3, 7), U, V, b),
        "rank_mismatch": (x, torch.randn(5, 3), V, b),
        "bias_shape": (x, U, V, torch.randn(4)),
        "dtype_mismatch": (x, U.double(), V, b),
        "device_mismatch": (x, U, V.to("meta"), b),
        "int_tensor": (x.int(), U, V, b),
        "not_tensor": (x.tolist(), U, V, b),
        "U_1d": (x, torch.randn(5), V, b),
        "rank_zero": (x, torch.randn(5, 0), torch.randn(0, 6), b),
    }[case]
    with pytest.raises(exc, match=match):
        lowrank_matmul(*args)


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead, in_f, out_f, r, bias", [
    ((300,), 1000, 777, 16, True), ((4, 129), 513, 1030, 64, False), ((257,), 300, 200, 200, True),
    ((70,), 96, 80, 1, True), ((64,), 128, 256, 256, False),
])
def test_gpu_matches_reference(triton_backend, lead, in_f, out_f, r, bias, dtype):
    _check_against_reference(*_inputs(lead, in_f, out_f, r, dtype, "cuda", bias), atol_scale=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_noncontiguous(triton_backend, dtype):
    _check_against_reference(*_inputs((33, 17), 250, 190, 24, dtype, "cuda", noncontig=True), atol_scale=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("r", [16, 64, 128])
def test_gpu_target_shapes_scaled_down(triton_backend, r):
    # the benchmark shape (M=8192, in=out=4096, bf16) at 1/4 scale per dim
    _check_against_reference(*_inputs((2048,), 1024, 1024, r, torch.bfloat16, "cuda"), atol_scale=1e-4)


@pytest.mark.gpu
def test_gpu_auto_backend_composed_and_compiles(monkeypatch, custom_op_calls):
    """auto on CUDA: the composed path while the table holds no entry for the shape; compiles fullgraph."""
    monkeypatch.delenv("LOWRANK_KERNELS_BACKEND", raising=False)
    monkeypatch.setattr(backend, "TABLE", {})
    x, U, V, b = (t.requires_grad_(True) for t in _inputs((4, 64), 256, 192, 32, torch.bfloat16, "cuda"))
    fn = torch.compile(lambda *a: lowrank_matmul(*a).float().square().sum(), fullgraph=True)
    fn(x, U, V, b).backward()
    ref = [t.detach().clone().requires_grad_(True) for t in (x, U, V, b)]
    lowrank_matmul_ref(*ref).float().square().sum().backward()
    for name, t, r in zip(NAMES[1:], (x, U, V, b), ref, strict=True):
        assert_verbose_allclose(t.grad.float(), r.grad.float(), atol=5e-2 * r.grad.abs().max().item(),
                                rtol=5e-2, name=name)
    assert custom_op_calls == []
