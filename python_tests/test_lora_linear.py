"""nn.LoRALinear (merge/unmerge), nn.fuse_peft_lora (PEFT equivalence) and nn.replace_linear."""

import copy
import math

import pytest
import torch
from torch import nn

from lowrank_kernels.nn import LoRALinear, LowRankLinear, fuse_peft_lora, replace_linear
from lowrank_kernels.nn import lora_linear as lora_linear_mod


def _layer(in_f=40, out_f=24, r=4, alpha=8.0, dropout=0.0, bias=True, dtype=torch.float32, device="cpu"):
    layer = LoRALinear(nn.Linear(in_f, out_f, bias=bias, device=device, dtype=dtype), r, alpha, dropout=dropout)
    with torch.no_grad():  # a trained-looking adapter: B = 0 would hide every adapter bug
        layer.lora_B.normal_(0.0, 0.2)
    return layer


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls of the fused op made by LoRALinear.forward."""
    calls = []
    real = lora_linear_mod.lora_matmul

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(lora_linear_mod, "lora_matmul", spy)
    return calls


def _manual(layer, x):
    return nn.functional.linear(x, layer.weight, layer.bias) + layer.scaling * (x @ layer.lora_A.T) @ layer.lora_B.T


def test_init_and_scaling():
    base = nn.Linear(20, 12)
    layer = LoRALinear(base, r=4, alpha=8)
    assert layer.base is base and not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.lora_A.shape == (4, 20) and layer.lora_B.shape == (12, 4)
    assert layer.scaling == 2.0 and not layer.lora_B.detach().any() and layer.lora_A.detach().all()
    assert LoRALinear(nn.Linear(20, 12), r=4, alpha=8, use_rslora=True).scaling == 4.0
    x = torch.randn(3, 20)
    torch.testing.assert_close(layer(x), base(x))  # B = 0: a fresh adapter changes nothing
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]


@pytest.mark.parametrize("kwargs, exc", [
    (dict(base=nn.Conv1d(2, 2, 1), r=2, alpha=1), TypeError),
    (dict(base=nn.Linear(4, 4), r=0, alpha=1), ValueError),
    (dict(base=nn.Linear(4, 4), r=2, alpha=float("inf")), ValueError),
    (dict(base=nn.Linear(4, 4), r=2, alpha=1, dropout=1.0), ValueError),
])
def test_bad_arguments(kwargs, exc):
    with pytest.raises(exc):
        LoRALinear(**kwargs)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
def test_fused_forward_backward(triton_backend, fused_calls, dtype, atol):
    layer = _layer(in_f=37, out_f=29, r=5, dtype=dtype)
    x = torch.randn(2, 9, 37, dtype=dtype, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    grads = [x.grad, layer.lora_A.grad, layer.lora_B.grad]
    assert layer.weight.grad is None and layer.bias.grad is None
    x2 = x.detach().clone().requires_grad_()
    ref = copy.deepcopy(layer)
    y2 = _manual(ref, x2)
    y2.backward(dy)
    torch.testing.assert_close(y, y2, atol=atol, rtol=atol)
    for g, g2 in zip(grads, [x2.grad, ref.lora_A.grad, ref.lora_B.grad], strict=True):
        torch.testing.assert_close(g, g2, atol=atol, rtol=atol)
    assert fused_calls == [x.shape]


def test_merge_unmerge_roundtrip(monkeypatch):
    layer = _layer()
    w0 = layer.weight.detach().clone()
    x = torch.randn(6, 40)
    y = layer(x)
    layer.merge()
    assert layer.merged

    def _fail(*args, **kwargs):
        raise AssertionError("a merged layer must not run the adapter")

    monkeypatch.setattr(lora_linear_mod, "lora_matmul", _fail)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.to_linear()(x), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    monkeypatch.undo()
    torch.testing.assert_close(layer(x), y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.to_linear()(x), y, rtol=1e-5, atol=1e-5)


def test_dropout_only_on_adapter_input(fused_calls):
    layer = _layer(dropout=0.5)
    x = torch.randn(8, 40, requires_grad=True)
    layer.train()
    torch.manual_seed(3)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    grads = [x.grad, layer.lora_A.grad, layer.lora_B.grad]
    # the same draws as F.dropout (PEFT's), and the backward reuses the forward's mask
    ref = copy.deepcopy(layer)
    ref.lora_A.grad = ref.lora_B.grad = None
    x2 = x.detach().clone().requires_grad_()
    torch.manual_seed(3)
    mask_x = nn.functional.dropout(x2, 0.5, training=True)
    expected = nn.functional.linear(x2, ref.weight, ref.bias) + ref.scaling * (mask_x @ ref.lora_A.T) @ ref.lora_B.T
    torch.testing.assert_close(y, expected)
    expected.backward(dy)
    for g, g2, name in zip(grads, [x2.grad, ref.lora_A.grad, ref.lora_B.grad], "xAB", strict=True):
        torch.testing.assert_close(g, g2, msg=name)
    assert len(fused_calls) == 1  # dropout in training: still the one op call (it draws the mask)
    layer.eval()
    torch.testing.assert_close(layer(x), _manual(layer, x))
    assert len(fused_calls) == 2  # eval: dropout is the identity


def _peft_linear(in_f, out_f, r, alpha, dropout=0.0):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(nn.Sequential(nn.Linear(in_f, out_f)),
                                peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["0"]))
    return model.base_model.model[0]


def _cost_of_step(layer, x):
    """GPU cost of one forward and one backward; ``large`` lists tensors with >= M * min(in, out) elements."""
    from lowrank_kernels.testing import count_gpu_cost

    x = x.clone().requires_grad_()
    m, in_f, out_f = x.shape[0], x.shape[1], layer.weight.shape[0]
    with count_gpu_cost(min_numel=m * min(in_f, out_f)) as fwd:
        y = layer(x)
    dy = torch.randn_like(y)
    with count_gpu_cost(min_numel=m * min(in_f, out_f)) as bwd:
        y.backward(dy)
    return fwd, bwd


@pytest.mark.parametrize("bias", [True, False])
def test_default_path_allocates_one_activation_each_way(monkeypatch, bias):
    """The composed default: forward creates exactly one (M, out) tensor, backward exactly one (M, in) tensor,
    no dW-shaped product for the frozen base, fewer launches than PEFT's layer; one dropout mask per step."""
    monkeypatch.delenv("LOWRANK_KERNELS_BACKEND", raising=False)
    m, in_f, out_f, r = 64, 48, 40, 4
    layer = _layer(in_f=in_f, out_f=out_f, r=r, bias=bias)
    x = torch.randn(m, in_f)
    fwd, bwd = _cost_of_step(layer, x)
    assert fwd.large == [fwd.large[0]] and fwd.large[0][1] == (m, out_f), fwd.large
    assert [shape for _, shape in bwd.large] == [(m, in_f)], bwd.large
    assert layer.weight.grad is None and (out_f, in_f) not in [s for _, s in bwd.large]
    assert fwd.launches <= 3 and bwd.launches <= 5 and fwd.syncs == bwd.syncs == 0, (fwd.ops, bwd.ops)
    peft_layer = _peft_linear(in_f, out_f, r, 8)
    peft_fwd, peft_bwd = _cost_of_step(peft_layer, x)
    assert len(peft_fwd.large) > len(fwd.large) and len(peft_bwd.large) > len(bwd.large)
    assert peft_fwd.launches > fwd.launches and peft_bwd.launches > bwd.launches

    layer = _layer(in_f=in_f, out_f=out_f, r=r, bias=bias, dropout=0.3).train()
    fwd, bwd = _cost_of_step(layer, x)
    assert fwd.ops["native_dropout"] == 1 and not any("dropout" in op or "bernoulli" in op for op in bwd.ops)
    assert [s for _, s in fwd.large].count((m, out_f)) == 1


# ------------------------------------------------------------------------------------------------ PEFT
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleDict({"q_proj": nn.Linear(24, 40), "v_proj": nn.Linear(24, 40, bias=False)})
        self.fc = nn.Linear(40, 24)
        self.head = nn.Linear(24, 3)

    def forward(self, x):
        h = torch.relu(self.attn["q_proj"](x)) * self.attn["v_proj"](x)
        return self.head(torch.relu(self.fc(h)))


def _peft_model(dropout=0.0, **cfg):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc"], lora_dropout=dropout,
                             **cfg)
    model = peft.get_peft_model(_Tiny(), config)
    with torch.no_grad():  # PEFT starts with B = 0; randomise so the adapters matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    return model


def _outputs_and_grads(model, x, seed):
    torch.manual_seed(seed)
    x = x.clone().requires_grad_()
    y = model(x)
    y.square().sum().backward()
    grads = {n.replace(".default.weight", ""): p.grad for n, p in model.named_parameters() if p.requires_grad}
    return y, x.grad, grads


@pytest.mark.parametrize("dropout, train", [(0.0, False), (0.2, True)])
def test_fuse_peft_lora_matches_peft(triton_backend, fused_calls, dropout, train):
    model = _peft_model(dropout=dropout)
    fused = fuse_peft_lora(copy.deepcopy(model))
    assert sum(isinstance(m, LoRALinear) for m in fused.modules()) == 3
    model.train(train)
    fused.train(train)
    x = torch.randn(5, 24)
    y, dx, grads = _outputs_and_grads(model, x, seed=7)
    y2, dx2, grads2 = _outputs_and_grads(fused, x, seed=7)
    torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx2, dx, rtol=1e-5, atol=1e-5)
    names = {n.replace(".weight", "").replace(".base_layer", ".base") for n in grads}
    assert set(grads2) == names and len(grads2) == 6
    assert len(fused_calls) == 3  # dropout in training too: the op draws the adapter's mask
    for n, g in grads.items():
        torch.testing.assert_close(grads2[n.replace(".weight", "")], g, rtol=1e-5, atol=1e-5, msg=n)


def test_fuse_peft_lora_keeps_parameter_objects():
    model = _peft_model()
    q = model.base_model.model.attn["q_proj"]
    a, b, w, s = q.lora_A["default"].weight, q.lora_B["default"].weight, q.base_layer.weight, q.scaling["default"]
    fused = fuse_peft_lora(model)
    new = fused.base_model.model.attn["q_proj"]
    assert fused is model and isinstance(new, LoRALinear)
    assert new.lora_A is a and new.lora_B is b and new.weight is w and new.scaling == s == 2.0


def test_fuse_peft_lora_rejects():
    with pytest.raises(ValueError, match="no peft"):
        fuse_peft_lora(_Tiny())
    peft = pytest.importorskip("peft")
    model = _peft_model()
    model.add_adapter("second", peft.LoraConfig(r=2, target_modules=["fc"]))
    with pytest.raises(ValueError, match="exactly one LoRA adapter"):
        fuse_peft_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # all-or-nothing
    model = _peft_model(use_dora=True)
    with pytest.raises(ValueError, match="variants"):
        fuse_peft_lora(model)


# ------------------------------------------------------------------------------------------- replace
@pytest.mark.parametrize("targets, expected", [
    (None, {"attn.q_proj", "attn.v_proj", "fc", "head"}),
    (["q_proj", "fc"], {"attn.q_proj", "fc"}),
    (r"attn\..*_proj", {"attn.q_proj", "attn.v_proj"}),
])
def test_replace_linear(targets, expected):
    model = _Tiny()
    dense = copy.deepcopy(model)
    out = replace_linear(model, rank=3, target_modules=targets)
    assert out is model
    got = {n for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert got == expected
    assert all(m.rank == 3 for m in model.modules() if isinstance(m, LowRankLinear))
    # the best rank-3 approximation of each converted layer: check one against its own SVD
    name = sorted(expected)[0]
    w = dense.get_submodule(name).weight.detach().double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    approx = model.get_submodule(name).to_linear().weight.detach().double()
    assert math.isclose(float((w - approx).norm()), float(s[3:].norm()), rel_tol=1e-4)
    assert model(torch.randn(2, 24)).shape == (2, 3)


def test_replace_linear_errors_and_lora_bases():
    with pytest.raises(ValueError, match="matched no"):
        replace_linear(_Tiny(), rank=2, target_modules=["nothing"])
    with pytest.raises(ValueError, match="head"):
        replace_linear(_Tiny(), rank=5, target_modules=["head"])  # head is 24 -> 3
    model = nn.Sequential(_layer(), nn.Linear(24, 24))
    replace_linear(model, rank=2)
    assert isinstance(model[0], LoRALinear) and type(model[0].base) is nn.Linear
    assert isinstance(model[1], LowRankLinear)
    assert isinstance(replace_linear(nn.Linear(8, 8), rank=2), LowRankLinear)


# --------------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gpu_composed_default_forward_backward(monkeypatch, dropout):
    """The default (composed, cuBLAS) path of a bf16 LoRALinear on CUDA: close to the fp32 model, one (M, out)
    tensor forward and one (M, in) tensor backward (without dropout), no dW."""
    monkeypatch.delenv("LOWRANK_KERNELS_BACKEND", raising=False)
    m, in_f, out_f, r = 512, 384, 256, 16
    layer = _layer(in_f=in_f, out_f=out_f, r=r, dtype=torch.bfloat16, device="cuda", dropout=dropout).train()
    ref = copy.deepcopy(layer).float()
    x = torch.randn(m, in_f, device="cuda", dtype=torch.bfloat16)
    torch.manual_seed(5)
    fwd, bwd = _cost_of_step(layer, x)
    if dropout == 0:
        assert [s for _, s in fwd.large] == [(m, out_f)] and [s for _, s in bwd.large] == [(m, in_f)]
    assert layer.weight.grad is None and layer.lora_A.grad is not None
    xr = x.float().requires_grad_()
    torch.manual_seed(5)  # the same draws: a bf16 tensor of x's shape through the same dropout kernel
    keep = nn.functional.dropout(torch.ones_like(x), dropout, training=True).float() if dropout else 1.0
    xr_drop = xr * keep
    y_ref = nn.functional.linear(xr, ref.weight, ref.bias) + ref.scaling * (xr_drop @ ref.lora_A.T) @ ref.lora_B.T
    torch.manual_seed(5)
    y = layer(x)
    scale = y_ref.abs().max().item()
    assert (y.float() - y_ref).abs().max().item() <= 2e-2 * scale



@pytest.mark.gpu
def test_gpu_bf16_layer_and_peft(triton_backend, fused_calls):
    layer = _layer(in_f=512, out_f=384, r=16, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(4, 100, 512, device="cuda", dtype=torch.bfloat16)
    ref = _manual(copy.deepcopy(layer).float(), x.float())
    assert (layer(x).float() - ref).abs().max() <= 2 * (_manual(layer, x).float() - ref).abs().max() + 1e-2
    assert len(fused_calls) == 1
    # PEFT keeps fp32 adapters on a bf16 base: the fused layer must take the casting (unfused) path
    # Both are bf16 computations of the same function, rounded differently (PEFT rounds x A^T to bf16,
    # the fused path keeps it in fp32), so each is compared with the fp32 model, not with the other.
    model = _peft_model().to("cuda", torch.bfloat16)
    fused = fuse_peft_lora(copy.deepcopy(model))
    xs = torch.randn(8, 24, device="cuda", dtype=torch.bfloat16)
    ref32 = copy.deepcopy(model).float()(xs.float())
    peft_err = (model(xs).float() - ref32).abs().max()
    assert (fused(xs).float() - ref32).abs().max() <= 2 * peft_err + 1e-2
