"""TensLoRA: tensor adapters over attention projections (Tucker / CP), TensLoRA+ LRs and rank allocation."""

import copy
import math

import pytest
import torch
from torch.func import functional_call

from lowrank_kernels.adapters import tenslora as T
from lowrank_kernels.adapters import tenslora_plus as TP
from lowrank_kernels.app.models import count_parameters, vit_tiny

DIM, DEPTH, HEADS = 32, 2, 4

SIZES = {"input": DIM, "head_dim": DIM // HEADS, "heads": HEADS, "output": DIM, "qkv": 3, "layers": DEPTH}
GROUPS = {"att": 6, "qkv": 2, "depth": 3, "att_qkv": 2, "att_depth": 3, "qkv_depth": 1, "att_qkv_depth": 1}


def _vit():
    return vit_tiny(dim=DIM, depth=DEPTH, heads=HEADS)


def _perturb(model, scale=0.2):
    with torch.no_grad():
        for ad in T.get_adapters(model):
            for p in ad.parameters():
                p.add_(scale * torch.randn_like(p))


def _naive_delta(ad: T.TensorAdapter, layer: int, proj: int) -> torch.Tensor:
    """ΔW (out, in) by slicing the full tensor: row h·head_dim + d of head h, as the attention reads it."""
    t = ad.full_tensor()
    idx = [slice(None)] * t.dim()
    if "layers" in ad.modes:
        idx[ad.modes.index("layers")] = layer
    if "qkv" in ad.modes:
        idx[ad.modes.index("qkv")] = proj
    t = t[tuple(idx)]  # (in, head_dim, heads) or (in, out)
    if t.dim() == 3:
        t = t.permute(0, 2, 1).reshape(t.shape[0], -1)
    return t.t()


@pytest.mark.parametrize("decomposition", ["tucker", "cp"])
@pytest.mark.parametrize("method", list(T.METHODS))
def test_init_is_identity_and_parameter_count(method, decomposition):
    model = _vit()
    x = torch.randn(3, 1, 8, 8)
    ref = model(x)
    modes = T.METHODS[method][0]
    ranks = "_".join(str(2 + i) for i in range(len(modes))) if decomposition == "tucker" else 3
    T.apply_tenslora(model, method=method, ranks=ranks, decomposition=decomposition)
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    dims = [SIZES[m] for m in modes]
    if decomposition == "tucker":
        rs = [2 + i for i in range(len(modes))]
        per = sum(r * d for r, d in zip(rs, dims, strict=True)) + math.prod(rs)
    else:
        per = 3 * sum(dims)
    assert len(T.get_adapters(model)) == GROUPS[method]
    assert count_parameters(model) == GROUPS[method] * per
    assert all(ad.num_parameters() == per for ad in T.get_adapters(model))


@pytest.mark.parametrize("decomposition", ["tucker", "cp"])
@pytest.mark.parametrize("method", ["att", "qkv_depth", "att_qkv_depth"])
def test_forward_and_grads_match_naive_reconstruction(method, decomposition):
    base = _vit()
    model = T.apply_tenslora(copy.deepcopy(base), method=method, ranks=3, decomposition=decomposition,
                             scaling=0.5)
    _perturb(model)
    x = torch.randn(4, 1, 8, 8)
    params = [p for ad in T.get_adapters(model) for p in ad.parameters()]
    y = model(x)
    g = torch.autograd.grad(y.square().sum(), params)
    # reference: the base model with W + 0.5·ΔW, ΔW sliced out of the full tensor
    over = {}
    for li, blk in enumerate(base.blocks):
        w = blk.attn.qkv.weight
        deltas = []
        for pi in range(3):
            ad = next(s[1] for s in model.blocks[li].attn.qkv._slots if s[0] == pi * DIM)
            deltas.append(_naive_delta(ad, li if "layers" in ad.modes else 0, pi if "qkv" in ad.modes else 0))
        over[f"blocks.{li}.attn.qkv.weight"] = w + 0.5 * torch.cat(deltas)
    y_ref = functional_call(base, over, (x,))
    g_ref = torch.autograd.grad(y_ref.square().sum(), params)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["att", "att_qkv_depth"])
def test_head_mode_maps_to_real_head_rows(method):
    model = T.apply_tenslora(_vit(), method=method, ranks=4)
    h, hd = 2, DIM // HEADS
    with torch.no_grad():
        for ad in T.get_adapters(model):
            ad.core.normal_()
            ad.factors["heads"].zero_()
            ad.factors["heads"][h] = 1.0  # only head h carries an update
    for blk in model.blocks:
        dw = blk.attn.qkv.delta_weight().detach()
        rows = torch.zeros(3 * DIM, dtype=torch.bool)
        for p in range(3):
            rows[p * DIM + h * hd: p * DIM + (h + 1) * hd] = True
        assert dw[~rows].abs().max() == 0  # nothing outside head h of Q, K and V
        assert (dw[rows].abs().sum(1) > 0).all()  # every row of head h is touched


def _hf_vit():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=64,
                    image_size=8, patch_size=2, num_channels=1, num_labels=5, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0)
    return ViTForImageClassification(cfg), {"pixel_values": torch.randn(3, 1, 8, 8)}


def _hf_roberta():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    cfg = RobertaConfig(vocab_size=50, hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                        intermediate_size=64, max_position_embeddings=40, num_labels=2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return RobertaForSequenceClassification(cfg), {"input_ids": torch.randint(3, 50, (3, 12))}


@pytest.mark.parametrize("build", [_hf_vit, _hf_roberta], ids=["vit", "roberta"])
def test_transformers_models_separate_projections(build):
    pytest.importorskip("transformers")
    model, batch = build()
    model.eval()
    ref = model(**batch).logits
    T.apply_tenslora(model, method="att_qkv_depth", ranks="4_4_4_3_2", target="qkv")
    torch.testing.assert_close(model(**batch).logits, ref, rtol=0, atol=0)
    (ad,) = T.get_adapters(model)
    assert ad.dims == (DIM, DIM // HEADS, HEADS, 3, DEPTH)
    wrapped = [m for m in model.modules() if isinstance(m, T.TensLoRALinear)]
    assert len(wrapped) == 3 * DEPTH
    _perturb(model)
    before = ad.num_reconstructions
    out = model(**batch).logits
    assert ad.num_reconstructions == before + 1  # 6 projections, one contraction
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ad.parameters())
    # head h of the query projection of layer 0 = rows h·hd:(h+1)·hd of the separate query Linear
    q0 = wrapped[0]
    with torch.no_grad():
        ad.factors["heads"].zero_()
        ad.factors["heads"][1] = 1.0
    dw = q0.delta_weight().detach()
    hd = DIM // HEADS
    assert dw[:hd].abs().max() == 0 and dw[2 * hd:].abs().max() == 0 and dw[hd:2 * hd].abs().max() > 0


def _hf_llama(kv_heads):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=50, hidden_size=DIM, intermediate_size=64, num_hidden_layers=DEPTH,
                      num_attention_heads=HEADS, num_key_value_heads=kv_heads, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval(), {"input_ids": torch.randint(0, 50, (2, 10))}


def test_llama_heads_come_from_the_config():
    pytest.importorskip("transformers")
    model, batch = _hf_llama(kv_heads=HEADS)
    assert not hasattr(model.model.layers[0].self_attn, "num_heads")  # only the config knows the head count
    ref = model(**batch).logits
    T.apply_tenslora(model, method="att_qkv_depth", ranks="4_4_4_3_2")
    (ad,) = T.get_adapters(model)
    assert ad.dims == (DIM, DIM // HEADS, HEADS, 3, DEPTH)
    torch.testing.assert_close(model(**batch).logits, ref, rtol=0, atol=0)
    _perturb(model)
    model(**batch).logits.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ad.parameters())


@pytest.mark.parametrize("method, target", [("att", "qkv"), ("depth", "qkv"), ("att_depth", "qkv"),
                                            ("att_qkv_depth", "kv"), ("qkv", "kv")])
def test_llama_grouped_query_attention_where_the_tensor_is_defined(method, target):
    pytest.importorskip("transformers")
    kv = 2
    model, batch = _hf_llama(kv_heads=kv)
    ref = model(**batch).logits
    modes, _ = T.METHODS[method]
    T.apply_tenslora(model, method=method, ranks=3, target=target)
    torch.testing.assert_close(model(**batch).logits, ref, rtol=0, atol=0)
    hd = DIM // HEADS
    for ad in T.get_adapters(model):
        size = dict(zip(ad.modes, ad.dims, strict=True))
        assert ad.out_dim in (HEADS * hd, kv * hd)
        if "heads" in modes:
            assert size["heads"] * size["head_dim"] == ad.out_dim and size["head_dim"] == hd
    _perturb(model)
    attn = model.model.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj"):
        layer = getattr(attn, name)
        if name[0] in target:
            assert isinstance(layer, T.TensLoRALinear)
            assert layer.delta_weight().shape == layer.base.weight.shape
    out = model(**batch).logits
    assert (out - ref).abs().max() > 0  # the perturbed adapters change the function
    out.square().sum().backward()


@pytest.mark.parametrize("method", ["qkv", "att_qkv", "qkv_depth", "att_qkv_depth"])
def test_llama_grouped_query_attention_refused_at_apply_time(method):
    pytest.importorskip("transformers")
    model, batch = _hf_llama(kv_heads=2)
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="grouped-query attention.*'att'"):
        T.apply_tenslora(model, method=method, target="qkv")
    assert {n: type(m) for n, m in model.named_modules()} == before  # nothing changed
    assert not hasattr(model, "tenslora_adapters")
    model(**batch)


def test_cache_once_per_forward_and_invalidated_by_parameter_change():
    model = T.apply_tenslora(_vit(), method="qkv_depth", ranks=4, target="qv")
    (ad,) = T.get_adapters(model)
    assert ad.dims[2] == 2  # qkv mode holds Q and V only
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(2, 1, 8, 8)
    for step in range(3):
        model(x).square().sum().backward()
        assert ad.num_reconstructions == step + 1
        opt.step()
        opt.zero_grad()
    k_rows = slice(DIM, 2 * DIM)
    dw = model.blocks[0].attn.qkv.delta_weight()  # outside a model forward: parameter versions invalidate
    assert ad.num_reconstructions == 4
    assert dw[k_rows].abs().max() == 0 and dw.abs().max() > 0  # K is not a target
    with torch.no_grad():
        y1 = model(x)
        y2 = model(x)
    torch.testing.assert_close(y1, y2)
    model(x)  # leaves a cache with a graph behind: copies and pickles must still work
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(x), model(x))
    (tad,) = T.get_adapters(twin)
    assert tad is not ad and twin.blocks[1].attn.qkv._slots[0][1] is tad  # the copy's wrappers use its adapter


def test_param_groups_tenslora_plus_learning_rates():
    model = T.apply_tenslora(_vit(), method="att_qkv_depth", ranks=4)
    model.head.requires_grad_(True)
    groups = TP.param_groups(model, lr=1e-3, core_mult=8.0, mode_mults={"layers": 0.5})
    by = {g["name"]: g for g in groups}
    (ad,) = T.get_adapters(model)
    assert by["tenslora.core"]["lr"] == pytest.approx(8e-3) and by["tenslora.core"]["params"] == [ad.core]
    assert by["tenslora.layers"]["lr"] == pytest.approx(5e-4)
    assert by["tenslora.input"]["lr"] == pytest.approx(1e-3)
    assert by["other"]["params"] == [model.head.weight, model.head.bias]
    n = sum(p.numel() for g in groups for p in g["params"])
    assert n == count_parameters(model)
    torch.optim.AdamW(groups)  # accepted as is
    with pytest.raises(ValueError, match="unknown modes"):
        TP.param_groups(model, 1e-3, mode_mults={"rows": 2.0})


def _planted(ranks, true_ranks, seed=0):
    """A Tucker adapter whose represented tensor has multilinear rank ``true_ranks``."""
    gen = torch.Generator().manual_seed(seed)
    ad = T.TensorAdapter(T.METHODS["att_qkv_depth"][0], [16, 8, 4, 3, 4], ranks)
    with torch.no_grad():
        core = torch.zeros(*ranks)
        core[tuple(slice(0, t) for t in true_ranks)] = torch.randn(*true_ranks, generator=gen)
        ad.core.copy_(core)
        for f in ad.factors.values():  # non-orthonormal factors, as after training
            f.mul_(1 + torch.rand(f.shape, generator=gen))
    return ad


def test_mode_metrics_flag_redundant_mode():
    ad = _planted([4, 4, 4, 3, 4], [4, 4, 1, 3, 4])
    met = TP.mode_metrics(ad)
    assert met["heads"]["top1_energy"] == pytest.approx(1.0, abs=1e-9)
    assert met["heads"]["normalized_entropy"] == pytest.approx(0.0, abs=1e-6)
    assert met["input"]["normalized_entropy"] > 0.3 and met["input"]["top1_energy"] < 0.9
    fresh = TP.mode_metrics(T.TensorAdapter(("input", "output", "qkv"), [8, 8, 3], [2, 2, 2]))
    assert math.isnan(fresh["input"]["entropy"])
    cp = TP.mode_metrics(T.TensorAdapter(("input", "output", "qkv"), [8, 8, 3], [2], "cp"))
    assert set(cp) == {"input", "output", "qkv"}


@pytest.mark.parametrize("decomposition", ["tucker", "cp"])
def test_mode_metrics_equal_full_tensor_unfolding_spectra(decomposition):
    ad = T.TensorAdapter(("input", "head_dim", "heads", "qkv"), [12, 5, 4, 3], 3, decomposition)
    with torch.no_grad():
        for p in ad.parameters():
            p.normal_()
    full = ad.full_tensor().detach().double()
    met = TP.mode_metrics(ad)
    for k, m in enumerate(ad.modes):
        e = torch.linalg.svdvals(torch.movedim(full, k, 0).reshape(full.shape[k], -1)).square()
        e = e[: min(3, full.shape[k])] / e.sum()
        assert met[m]["top1_energy"] == pytest.approx(float(e[0]), rel=1e-6)
        assert met[m]["entropy"] == pytest.approx(float(-(e * e.log()).sum()), rel=1e-6, abs=1e-9)


def test_allocate_ranks_respects_budget_and_keeps_update():
    ad = _planted([4, 4, 4, 3, 4], [4, 4, 1, 3, 2])
    before = ad.full_tensor().detach()
    budget = ad.num_parameters() + 40
    ranks, same = TP.allocate_ranks(ad, budget)
    assert same is ad and ranks == ad.ranks
    assert ranks[2] == 2  # the redundant heads mode is compressed to the minimum
    assert ad.num_parameters() <= budget and ad.num_parameters() == (
        sum(r * d for r, d in zip(ranks, ad.dims, strict=True)) + math.prod(ranks))
    assert all(r >= t for r, t in zip(ranks, [4, 4, 1, 3, 2], strict=True))
    torch.testing.assert_close(ad.full_tensor().detach(), before, rtol=1e-4, atol=1e-5)


def test_resize_expand_is_exact_and_truncate_is_hosvd():
    ad = _planted([3, 3, 3, 2, 3], [3, 3, 3, 2, 3], seed=1)
    before = ad.full_tensor().detach()
    TP.resize_adapter(ad, [6, 5, 4, 3, 4])  # expand (heads to its full size, qkv to 3)
    assert ad.core.shape == (6, 5, 4, 3, 4)
    torch.testing.assert_close(ad.full_tensor().detach(), before, rtol=1e-4, atol=1e-5)
    TP.resize_adapter(ad, [3, 3, 3, 2, 3])  # back to the true multilinear rank: still exact
    torch.testing.assert_close(ad.full_tensor().detach(), before, rtol=1e-4, atol=1e-5)
    TP.resize_adapter(ad, [2, 2, 2, 2, 2])  # lossy: HOSVD error, smaller than the update itself
    err = (ad.full_tensor().detach() - before).norm() / before.norm()
    assert 0 < err < 1


def test_allocate_then_train_in_model():
    model = T.apply_tenslora(_vit(), method="att_qkv_depth", ranks=4)
    _perturb(model)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        y = model(x)
    (ad,) = T.get_adapters(model)
    TP.allocate_ranks(ad, budget=ad.num_parameters() + 200)
    with torch.no_grad():
        torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-4)
    model(x).sum().backward()  # the new parameters are wired in
    assert ad.core.grad is not None


def test_errors():
    with pytest.raises(ValueError, match="method"):
        T.apply_tenslora(_vit(), method="heads")
    with pytest.raises(ValueError, match="5 per-mode ranks"):
        T.apply_tenslora(_vit(), method="att_qkv_depth", ranks="8_8_8")
    with pytest.raises(ValueError, match="single rank"):
        T.apply_tenslora(_vit(), method="qkv", ranks=[2, 3, 4], decomposition="cp")
    with pytest.raises(ValueError, match="target"):
        T.apply_tenslora(_vit(), target="qx")
    with pytest.raises(ValueError, match="ranks string"):
        T.parse_ranks("8-8", 2, "tucker")
    with pytest.raises(ValueError, match="no attention"):
        T.apply_tenslora(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    model = T.apply_tenslora(_vit(), decomposition="cp", ranks=2)
    with pytest.raises(ValueError, match="Tucker"):
        TP.allocate_ranks(T.get_adapters(model)[0], 10_000)
    with pytest.raises(ValueError, match="already"):
        T.apply_tenslora(model)
    with pytest.raises(ValueError, match="budget"):
        TP.allocate_ranks(_planted([4, 4, 4, 3, 4], [1, 1, 1, 1, 1]), 10)


def _finetune_bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "adapters_finetune.py"
    spec = importlib.util.spec_from_file_location("_adapters_finetune", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_finetune_tenslora_and_lora_beat_head_only():
    """Digits 0-4 -> 5-9 (bench/adapters_finetune.py, shortened): adapters beat the linear probe."""
    bench = _finetune_bench()
    rows = bench.run(quick=True, methods=("head", "lora_qkv", "tenslora:att_qkv_depth:tucker:8_8_4_3_2+"),
                     seeds=(0,), steps=100, pretrain_steps=150)
    acc = {r["method"].split()[0]: r["accuracy"] for r in rows}
    params = {r["method"].split()[0]: r["trainable_params"] for r in rows}
    assert acc["lora_qkv"] >= acc["head"] + 5, acc
    assert acc["tenslora+"] >= acc["head"] + 5, acc
    assert params["tenslora+"] < params["lora_qkv"]


def _grads_through(model, x, params):
    y = model(x)
    return y, torch.autograd.grad(y.square().sum(), params)


def test_fused_kernel_path_matches_torch_path(triton_backend, monkeypatch):
    """The adapted Linear runs ops.lora_matmul: Triton kernel (interpreted on CPU) == PyTorch reference."""
    model = T.apply_tenslora(_vit(), method="att_qkv_depth", ranks=4)
    _perturb(model)
    params = [p for ad in T.get_adapters(model) for p in ad.parameters()]
    x = torch.randn(2, 1, 8, 8)
    y, g = _grads_through(model, x, params)
    monkeypatch.setenv("LOWRANK_KERNELS_BACKEND", "torch")
    y_ref, g_ref = _grads_through(model, x, params)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_low_precision_matches_fp32(dtype, monkeypatch):
    """Kernel error in fp16/bf16 <= 2x PyTorch's same-precision error against an fp32 reference (+ atol)."""
    model = T.apply_tenslora(_vit(), method="att_qkv_depth", ranks=4).cuda()
    _perturb(model)
    x = torch.randn(8, 1, 8, 8, device="cuda")
    low = copy.deepcopy(model).to(dtype)
    y = low(x.to(dtype)).float()  # Triton lora_matmul
    monkeypatch.setenv("LOWRANK_KERNELS_BACKEND", "torch")
    ref = model(x)
    y_torch = low(x.to(dtype)).float()
    err, torch_err = (y - ref).abs().max(), (y_torch - ref).abs().max()
    assert err <= 2 * torch_err + 1e-2, (float(err), float(torch_err))
