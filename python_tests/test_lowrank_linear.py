"""LowRankLinear: conversions, in-place resize (exact growth, best-rank shrink), optimizer interplay."""

import pytest
import torch
from torch import nn

from lowrank_kernels.nn import LowRankLinear, ResizeInfo
from lowrank_kernels.ops import lowrank_matmul_ref
from lowrank_kernels.testing import assert_verbose_allclose


def _truncated(w: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def _product(layer: LowRankLinear) -> torch.Tensor:
    return layer.U.detach().double() @ layer.V.detach().double()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("in_f, out_f, rank", [(13, 7, 3), (20, 33, 20)])
def test_from_linear_to_linear_is_truncated_svd(in_f, out_f, rank, bias):
    lin = nn.Linear(in_f, out_f, bias=bias, dtype=torch.float64)
    layer = LowRankLinear.from_linear(lin, rank)
    assert layer.rank == rank and layer.U.shape == (out_f, rank) and layer.V.shape == (rank, in_f)
    back = layer.to_linear()
    assert isinstance(back, nn.Linear) and back.weight.dtype == torch.float64
    assert_verbose_allclose(back.weight, _truncated(lin.weight, rank), atol=1e-10, name="weight")
    if bias:
        assert_verbose_allclose(back.bias, lin.bias, name="bias")
    else:
        assert back.bias is None and layer.bias is None
    x = torch.randn(4, 3, in_f, dtype=torch.float64)
    assert_verbose_allclose(layer(x), back(x), atol=1e-10, name="forward")
    # the split is balanced: U^T U = V V^T = diag(S)
    assert_verbose_allclose(layer.U.t() @ layer.U, layer.V @ layer.V.t(), atol=1e-10, name="balance")


def test_forward_matches_reference_and_backward_reaches_all_params():
    layer = LowRankLinear(9, 6, 4)
    x = torch.randn(2, 5, 9)
    y = layer(x)
    assert y.shape == (2, 5, 6)
    assert_verbose_allclose(y, lowrank_matmul_ref(x, layer.U, layer.V, layer.bias), atol=1e-6)
    y.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def test_init_scale_like_linear():
    layer = LowRankLinear(256, 256, 32, dtype=torch.float64)
    var = _product(layer).var().item()
    assert 0.5 / (3 * 256) < var < 2.0 / (3 * 256)
    assert "rank=32" in repr(layer) and "in_features=256" in repr(layer)


@pytest.mark.parametrize("old, new", [(3, 5), (4, 4), (2, 9)])
def test_resize_up_keeps_function_and_parameter_identity(old, new):
    layer = LowRankLinear(11, 9, old, dtype=torch.float64)
    x = torch.randn(6, 11, dtype=torch.float64)
    layer(x).sum().backward()  # a stale gradient of the old shape must not survive a rank change
    before, w_before = layer(x).detach(), _product(layer)
    u_obj, v_obj, b_obj = layer.U, layer.V, layer.bias
    info = layer.resize(new)
    assert isinstance(info, ResizeInfo) and info.added == new - old
    assert layer.U is u_obj and layer.V is v_obj and layer.bias is b_obj
    assert layer.U.grad is None or layer.U.grad.shape == layer.U.shape
    assert layer.rank == new and layer.U.shape == (9, new) and layer.V.shape == (new, 11)
    assert_verbose_allclose(_product(layer), w_before, atol=1e-12, name="U V")
    assert_verbose_allclose(layer(x), before, atol=1e-12, name="forward")
    # descending singular values; added ones are zero and the new V rows are orthogonal to the old ones
    sv = torch.linalg.svdvals(w_before)[:old]
    assert_verbose_allclose(info.singular_values[:old], sv, atol=1e-10, name="singular values")
    assert torch.all(info.singular_values[old:] == 0)
    if new > old:
        assert torch.all(layer.U[:, old:] == 0) and layer.V[old:].abs().sum() > 0
        assert_verbose_allclose(layer.V[old:] @ layer.V[:old].t(), torch.zeros(new - old, old, dtype=torch.float64),
                                atol=1e-10, name="orthogonal completion")


@pytest.mark.parametrize("old, new", [(6, 2), (5, 1)])
def test_resize_down_is_best_rank_k(old, new):
    layer = LowRankLinear(12, 10, old, bias=False, dtype=torch.float64)
    w = _product(layer)
    info = layer.resize(new)
    assert layer.rank == new and info.added == 0
    assert_verbose_allclose(_product(layer), _truncated(w, new), atol=1e-10, name="best rank-k")
    assert_verbose_allclose(torch.linalg.svdvals(_product(layer))[:new], torch.linalg.svdvals(w)[:new], atol=1e-10)
    assert_verbose_allclose(info.singular_values, torch.linalg.svdvals(w)[:new], atol=1e-10)


@pytest.mark.parametrize("old, new", [(4, 6), (5, 3)])
def test_resize_info_maps_parameters_and_gradients(old, new):
    layer = LowRankLinear(10, 8, old, dtype=torch.float64)
    x = torch.randn(7, 10, dtype=torch.float64)
    u_old, v_old = layer.U.detach().clone(), layer.V.detach().clone()
    layer(x).sin().sum().backward()
    gu_old, gv_old = layer.U.grad.clone(), layer.V.grad.clone()
    info = layer.resize(new)
    k = min(old, new)
    assert info.left.shape == (old, new) and info.right.shape == (old, new)
    assert_verbose_allclose(info.map_param_U(u_old), layer.U, atol=1e-10, name="U map")
    assert_verbose_allclose(info.map_param_V(v_old)[:k], layer.V[:k], atol=1e-10, name="V map")
    if new >= old:  # same function: gradients map exactly (added U columns get fresh gradient)
        layer.zero_grad()
        layer.U.grad = layer.V.grad = None
        layer(x).sin().sum().backward()
        assert_verbose_allclose(info.map_grad_U(gu_old)[:, :k], layer.U.grad[:, :k], atol=1e-10, name="dU map")
        assert_verbose_allclose(info.map_grad_V(gv_old), layer.V.grad, atol=1e-10, name="dV map")
        assert layer.U.grad[:, k:].abs().sum() > 0 or new == old


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam])
def test_optimizer_steps_after_resize(opt_cls):
    layer = LowRankLinear(8, 6, 3)
    opt = opt_cls(layer.parameters(), lr=1e-2)
    x = torch.randn(5, 8)
    layer(x).square().mean().backward()
    opt.step()
    opt.zero_grad()
    info = layer.resize(5)
    for p, fn in ((layer.U, info.map_grad_U), (layer.V, info.map_grad_V)):
        state = opt.state.get(p, {})
        if "exp_avg" in state:  # first moment maps like a gradient; second moment reset
            state["exp_avg"] = fn(state["exp_avg"])
            state["exp_avg_sq"] = torch.zeros_like(p)
    before = [p.detach().clone() for p in layer.parameters()]
    layer(x).square().mean().backward()
    opt.step()
    assert layer.U.grad.shape == (6, 5)
    assert all(not torch.equal(b, p) for b, p in zip(before, layer.parameters(), strict=True))


def test_resize_float32_and_zero_layer():
    layer = LowRankLinear(7, 5, 2)
    with torch.no_grad():
        layer.U.zero_()
    layer.resize(4)  # all singular values zero: still a valid, finite resize
    assert torch.isfinite(layer.V).all() and torch.all(layer.U == 0) and layer.U.dtype == torch.float32


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_args_raise(bad):
    with pytest.raises((ValueError, TypeError)):
        LowRankLinear(4, 4, bad)
    with pytest.raises((ValueError, TypeError)):
        LowRankLinear(4, 4, 2).resize(bad)
    with pytest.raises((ValueError, TypeError)):
        LowRankLinear.from_linear(nn.Linear(4, 4), bad)


def test_rank_too_large_and_wrong_module_raise():
    with pytest.raises(ValueError, match="new_rank=6"):
        LowRankLinear(5, 8, 2).resize(6)
    with pytest.raises(ValueError, match="rank=5"):
        LowRankLinear.from_linear(nn.Linear(4, 9), 5)
    with pytest.raises(TypeError, match="nn.Linear"):
        LowRankLinear.from_linear(nn.Conv1d(3, 3, 1), 2)
    with pytest.raises(ValueError, match="in_features"):
        LowRankLinear(5, 8, 2)(torch.randn(3, 6))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_layer_matches_dense_and_resizes(dtype):
    lin = nn.Linear(300, 200, device="cuda", dtype=dtype)
    layer = LowRankLinear.from_linear(lin, 32)
    x = torch.randn(4, 50, 300, device="cuda", dtype=dtype)
    dense = layer.to_linear()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert_verbose_allclose(layer(x).float(), dense(x).float(), atol=tol, rtol=tol, name="forward")
    before = layer(x).detach()
    layer.resize(48)
    assert_verbose_allclose(layer(x).float(), before.float(), atol=tol, rtol=tol, name="after grow")
    layer(x).float().square().mean().backward()
    assert layer.U.grad.shape == (200, 48) and torch.isfinite(layer.V.grad).all()


@pytest.mark.parametrize("new_rank", [3, 9])
def test_backward_after_resize_while_old_graph_alive(new_rank):
    """A graph built before the resize (a live ``loss``) must not poison the next backward."""
    layer = LowRankLinear(12, 10, rank=6)
    old_loss = layer(torch.randn(4, 12)).square().sum()
    old_loss.backward(retain_graph=True)
    info = layer.resize(new_rank)
    assert info.left.dtype == torch.float32 and layer.U.shape == (10, new_rank)
    layer.zero_grad(set_to_none=True)
    layer(torch.randn(4, 12)).square().sum().backward()
    assert layer.U.grad.shape == (10, new_rank) and layer.V.grad.shape == (new_rank, 12)
    del old_loss


# ------------------------------------------------------------------------------- Conv1D and state dicts
class _Conv1D(nn.Module):
    """transformers' ``Conv1D`` layout (``weight (in, out)``, ``y = x W + b``), without importing transformers."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf, dtype=torch.float64))
        self.bias = nn.Parameter(torch.randn(nf, dtype=torch.float64))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)


_Conv1D.__name__ = "Conv1D"


@pytest.mark.parametrize("rank, exact", [(6, True), (3, False)])
def test_from_conv1d_is_exact_at_full_rank(rank, exact):
    conv = _Conv1D(nf=9, nx=6)  # in 6 -> out 9
    layer = LowRankLinear.from_linear(conv, rank)
    assert (layer.in_features, layer.out_features, layer.rank) == (6, 9, rank)
    assert_verbose_allclose(_product(layer), _truncated(conv.weight.t(), rank), atol=1e-10, name="U V")
    x = torch.randn(4, 6, dtype=torch.float64)
    if exact:
        assert_verbose_allclose(layer(x), conv(x), atol=1e-10, name="y")
    else:
        assert (layer(x) - conv(x)).abs().max() > 1e-3  # a real truncation, not the identity
    with pytest.raises(ValueError, match="Conv1D"):
        LowRankLinear.from_linear(conv, 7)


@pytest.mark.parametrize("old, new", [(2, 5), (5, 2), (4, 4)])
def test_load_state_dict_of_another_rank_resizes_in_place(old, new):
    src = LowRankLinear(12, 10, new, dtype=torch.float64)
    dst = LowRankLinear(12, 10, old, dtype=torch.float64)
    u, v = dst.U, dst.V
    dst(torch.randn(3, 12, dtype=torch.float64)).sum().backward()
    missing, unexpected = dst.load_state_dict(src.state_dict())
    assert not missing and not unexpected
    assert dst.rank == new and dst.U is u and dst.V is v
    assert (u.grad is None) == (old != new)  # a stale-shaped gradient is dropped, a valid one kept
    x = torch.randn(3, 12, dtype=torch.float64)
    assert_verbose_allclose(dst(x), src(x), atol=0, name="y")
    dst(x).sum().backward()  # the autograd accumulator follows the new shape
    assert dst.U.grad.shape == (10, new)


def test_load_state_dict_rank_inside_a_model_and_mismatches():
    model = nn.Sequential(LowRankLinear(8, 8, 2), nn.ReLU(), LowRankLinear(8, 4, 3))
    other = nn.Sequential(LowRankLinear(8, 8, 6), nn.ReLU(), LowRankLinear(8, 4, 1))
    model.load_state_dict(other.state_dict())
    assert [model[0].rank, model[2].rank] == [6, 1]
    bad = LowRankLinear(9, 8, 2).state_dict()  # other in_features: not a rank change, torch's size error
    with pytest.raises(RuntimeError, match="size mismatch"):
        LowRankLinear(8, 8, 2).load_state_dict(bad)
    dense = nn.Linear(8, 8).state_dict()
    with pytest.raises(RuntimeError, match="Missing key"):
        LowRankLinear(8, 8, 2).load_state_dict(dense)
