"""ops.q3r_apply: the Triton kernel (interpreted on CPU, compiled on GPU) vs the PyTorch reference, the
reference vs the formula written out in fp64, and bad inputs."""

import importlib
import math

import pytest
import torch

from lowrank_kernels import ops
from lowrank_kernels.ops.q3r_apply import q3r_apply_ref
from lowrank_kernels.testing import assert_close_to_reference, assert_verbose_allclose

q3r_apply_mod = importlib.import_module("lowrank_kernels.ops.q3r_apply")  # ops.q3r_apply is the function
HYPER = dict(step=3, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, lmbda=0.3)


def _state(shape, dtype, device):
    p = torch.randn(shape, device=device)
    g = torch.randn(shape, device=device)
    m = 0.1 * torch.randn(shape, device=device)
    v = 0.1 * torch.rand(shape, device=device)
    return [t.to(dtype) for t in (p, g, m, v)]


def _factors(M, N, layout, device, ranks=(6, 10)):
    """Factor lists over rows of an (M, N) weight; 'slices' leaves gaps and one operator without triplets."""
    if layout == "none":
        return []
    if layout == "full":
        return [(0, M, torch.randn(M, ranks[1], device=device), torch.randn(ranks[1], N, device=device))]
    third = M // 3
    return [(0, third, torch.randn(third, ranks[0], device=device), torch.randn(ranks[0], N, device=device)),
            (third, 2 * third - 3, None, None),
            (2 * third, M, torch.randn(M - 2 * third, ranks[1], device=device),
             torch.randn(ranks[1], N, device=device))]


def _formula_fp64(p, g, m, v, factors, step, lr, betas, eps, weight_decay, lmbda):
    """The update written out once, in fp64, independent of both implementations."""
    p, g, m, v = (t.double() for t in (p, g, m, v))
    b1, b2 = betas
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    Gq = torch.zeros_like(p)
    for s, e, A, B in factors:
        Gq[s:e] = 2 * lmbda * (p[s:e] + (0 if A is None else A.double() @ B.double()))
    adam = (m / (1 - b1 ** step)) / ((v / (1 - b2 ** step)).sqrt() + eps)
    return p - lr * (adam + weight_decay * p + Gq), m, v


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("layout", ["none", "full", "slices"])
@pytest.mark.parametrize("shape", [(70, 45), (33, 96)])
def test_reference_matches_formula(layout, shape, fused, device):
    """Both CPU paths of the reference: eager, and the Adam part through torch's fused CPU AdamW kernel."""
    p, g, m, v = _state(shape, torch.float64, device)
    assert q3r_apply_mod._can_fuse_adam(p, g, m, v) == (torch.device(device).type == "cpu")
    factors = [(s, e, None if A is None else A.double(), None if B is None else B.double())
               for s, e, A, B in _factors(*shape, layout, device)]
    want = _formula_fp64(p, g, m, v, factors, **HYPER)
    kw = dict(HYPER)
    b1, b2 = kw.pop("betas")
    q3r_apply_ref(p, g, m, v, factors, beta1=b1, beta2=b2, fused=fused, **kw)
    for got, exp, name in zip((p, m, v), want, ("p", "exp_avg", "exp_avg_sq"), strict=True):
        assert_verbose_allclose(got, exp, rtol=1e-12, atol=1e-12, name=name)


@pytest.mark.parametrize("layout", ["none", "full", "slices"])
@pytest.mark.parametrize("shape", [(70, 45), (17, 130)])
@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 2e-6), (torch.float16, 2e-3)])
def test_kernel_matches_reference(layout, shape, dtype, atol, triton_backend, device):
    base = _state(shape, dtype, device)
    factors = _factors(*shape, layout, device)
    ref = [t.clone() for t in base]
    out = [t.clone() for t in base]
    ops.q3r_apply(*out, factors, **HYPER)
    kw = dict(HYPER)
    b1, b2 = kw.pop("betas")
    if dtype == torch.float32:
        q3r_apply_ref(*ref, factors, beta1=b1, beta2=b2, **kw)
        for got, exp, name in zip(out[::2] + out[3:], ref[::2] + ref[3:], ("p", "exp_avg", "exp_avg_sq"),
                                  strict=True):
            assert_verbose_allclose(got, exp, rtol=1e-5, atol=atol, name=name)
    else:  # half: no worse than the reference run in half precision, both against fp64
        want = _formula_fp64(*base, factors, **HYPER)
        q3r_apply_ref(*ref, factors, beta1=b1, beta2=b2, **kw)
        for got, same, exp, name in zip((out[0], out[2], out[3]), (ref[0], ref[2], ref[3]), want,
                                        ("p", "exp_avg", "exp_avg_sq"), strict=True):
            assert_close_to_reference(got, exp, same, name=name, atol=atol)
    assert torch.equal(out[1], base[1]), "grad must not be modified"


def test_kernel_one_dim_and_row_blocks_across_slices(triton_backend, device):
    """A bias (1-D, plain AdamW) and slices whose boundaries fall inside a 64-row block."""
    shape = (150, 40)
    base = _state(shape, torch.float32, device)
    factors = [(0, 50, torch.randn(50, 4, device=device), torch.randn(4, 40, device=device)),
               (50, 100, torch.randn(50, 7, device=device), torch.randn(7, 40, device=device)),
               (100, 150, torch.randn(50, 3, device=device), torch.randn(3, 40, device=device))]
    out = [t.clone() for t in base]
    ops.q3r_apply(*out, factors, **HYPER)
    want = _formula_fp64(*base, factors, **HYPER)
    assert_verbose_allclose(out[0], want[0], rtol=1e-5, atol=2e-6, name="p")
    bias = _state((77,), torch.float32, device)
    want = _formula_fp64(*bias, [], **HYPER)
    ops.q3r_apply(*bias, **HYPER)
    assert_verbose_allclose(bias[0], want[0], rtol=1e-5, atol=2e-6, name="bias")


def test_adamw_equivalence_without_factors(device):
    """No factors and lmbda ignored: exactly torch.optim.AdamW's single-tensor update."""
    p = torch.randn(13, 7, device=device, requires_grad=True)
    q = p.detach().clone()
    opt = torch.optim.AdamW([p], lr=1e-2, betas=(0.8, 0.99), weight_decay=0.05, foreach=False)
    m, v = torch.zeros_like(q), torch.zeros_like(q)
    for step in range(1, 4):
        g = torch.randn_like(q)
        p.grad = g.clone()
        opt.step()
        ops.q3r_apply(q, g, m, v, step=step, lr=1e-2, betas=(0.8, 0.99), weight_decay=0.05, lmbda=1.0)
    assert_verbose_allclose(q, p.detach(), rtol=1e-6, atol=1e-7, name="p vs AdamW")


@pytest.mark.parametrize(("change", "match", "err"), [
    (dict(shape_g=(5, 4)), "grad has shape", ValueError),
    (dict(step=0), "step", ValueError),
    (dict(lr=float("nan")), "lr", ValueError),
    (dict(betas=(1.0, 0.9)), "betas", ValueError),
    (dict(factors=[(0, 4, torch.randn(4, 2), torch.randn(3, 6))]), "do not fit", ValueError),
    (dict(factors=[(0, 4, torch.randn(4, 2), None)]), "both", ValueError),
    (dict(factors=[(0, 4, None, None), (3, 6, None, None)]), "overlap", ValueError),
    (dict(factors=[(0, 9, None, None)]), "out of range", ValueError),
    (dict(dtype=torch.int32), "floating", TypeError),
    (dict(dtype_m=torch.float64), "exp_avg has dtype torch.float64 but p has torch.float32", TypeError),
    (dict(factors=[(0, 4, torch.randn(4, 2), torch.randn(2, 6, dtype=torch.float64))]), "A has dtype", TypeError),
])
def test_errors(change, match, err):
    dtype = change.get("dtype", torch.float32)
    p, v = torch.zeros(6, 6, dtype=dtype), torch.zeros(6, 6)
    m = torch.zeros(6, 6, dtype=change.get("dtype_m", torch.float32))
    g = torch.zeros(change.get("shape_g", (6, 6)))
    kw = dict(step=change.get("step", 1), lr=change.get("lr", 1e-3), betas=change.get("betas", (0.9, 0.999)))
    with pytest.raises(err, match=match):
        ops.q3r_apply(p, g, m, v, change.get("factors", []), **kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fused", [True, False])
def test_reference_low_precision_computes_in_fp32(dtype, fused):
    """fp16/bf16: the reference computes in fp32 and rounds once into the tensors' dtype, as the kernel does.

    Gradients of 1e-5 make ``(1 - b2) g^2`` underflow fp16 and ``eps = 1e-8`` round to 0 there: computed in
    fp16 the denominator is 0 and the weight becomes -inf."""
    torch.manual_seed(0)
    shape = (24, 20)
    p, g = torch.randn(shape), 1e-5 * torch.randn(shape)
    m, v = torch.zeros(shape), torch.zeros(shape)
    factors = [(0, 12, 0.1 * torch.randn(12, 3), torch.randn(3, 20)), (12, 24, None, None)]
    hyper = dict(step=1, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, lmbda=0.3)
    low = [t.to(dtype) for t in (p, g, m, v)]
    want = _formula_fp64(*low, factors, **hyper)  # the exact update of the rounded inputs
    kw = dict(hyper)
    b1, b2 = kw.pop("betas")
    q3r_apply_ref(*low, factors, beta1=b1, beta2=b2, fused=fused, **kw)
    tiny = torch.finfo(dtype).tiny * torch.finfo(dtype).eps  # the smallest subnormal: m and v sit down there
    for got, exp, name in zip((low[0], low[2], low[3]), want, ("p", "exp_avg", "exp_avg_sq"), strict=True):
        assert bool(torch.isfinite(got).all()), f"{name} is not finite"
        # one rounding into the dtype (half an ulp), plus fp32's own error
        assert_verbose_allclose(got, exp, rtol=torch.finfo(dtype).eps, atol=tiny, name=f"{name} ({dtype})")


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["none", "slices"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_gpu(layout, dtype, triton_backend):
    shape = (576, 192)
    base = _state(shape, dtype, "cuda")
    factors = _factors(*shape, layout, "cuda", ranks=(78, 78))
    out = [t.clone() for t in base]
    ops.q3r_apply(*out, factors, **HYPER)
    want = _formula_fp64(*base, factors, **HYPER)
    ref = [t.clone() for t in base]
    kw = dict(HYPER)
    b1, b2 = kw.pop("betas")
    q3r_apply_ref(*ref, factors, beta1=b1, beta2=b2, **kw)
    tol = 1e-5 if dtype == torch.float32 else 0.0
    for got, same, exp, name in zip((out[0], out[2], out[3]), (ref[0], ref[2], ref[3]), want,
                                    ("p", "exp_avg", "exp_avg_sq"), strict=True):
        scale = max(1.0, float(exp.abs().max()))
        assert_close_to_reference(got, exp, same, name=name, atol=tol * scale + 1e-6)
    assert math.isfinite(float(out[0].float().sum()))
