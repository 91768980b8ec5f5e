"""Spectral (HT-SR) LoRA rank allocation: Hill α, MP spikes, allocation, PEFT round trip, quantized bases."""

import math

import pytest
import torch
from torch import nn

from lowrank_kernels.adapters import spectral as S
from lowrank_kernels.app.models import vit_tiny


def _orthogonal(n, k, gen):
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    return q


def _matrix_with_eigs(lam, m, n, seed=0):
    """(m, n) matrix whose WᵀW eigenvalues are ``lam`` (len = min(m, n))."""
    gen = torch.Generator().manual_seed(seed)
    k = len(lam)
    u, v = _orthogonal(m, k, gen), _orthogonal(n, k, gen)
    return (u * lam.sqrt()) @ v.T


def _power_law_eigs(alpha, n, xmin=1.0):
    # deterministic quantiles of the density ∝ λ^{-α}, λ ≥ xmin
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return (xmin * (1 - u) ** (-1 / (alpha - 1))).sort().values


@pytest.mark.parametrize("method", ["ks", "median"])
@pytest.mark.parametrize("alpha", [2.0, 3.5, 5.0])
def test_hill_alpha_recovers_planted_power_law(method, alpha):
    lam = _power_law_eigs(alpha, 160)
    w = _matrix_with_eigs(lam, 200, 160, seed=int(alpha * 10)).float()
    got = S.eigenvalues([w])[0].double()
    torch.testing.assert_close(got, lam, rtol=1e-3, atol=1e-4)  # σ² of W is the planted spectrum
    a, d = S.hill_alpha(got, method=method)
    assert abs(float(a) - alpha) / alpha < 0.10, (method, float(a), alpha)
    assert 0 <= float(d) < 0.2


def test_ks_scan_finds_tail_above_a_flat_bulk():
    # A flat bulk below a power-law tail: the median xmin sits in the bulk; the KS scan must find the tail.
    tail = _power_law_eigs(3.0, 120, xmin=1.0)
    bulk = torch.linspace(0.05, 0.9, 200, dtype=torch.float64)
    lam = torch.cat([bulk, tail]).sort().values
    a_ks, _ = S.hill_alpha(lam[None], method="ks")
    assert abs(float(a_ks) - 3.0) / 3.0 < 0.10, float(a_ks)


def test_hill_ks_vectorised_matches_loop():
    gen = torch.Generator().manual_seed(1)
    lam = torch.rand(3, 40, generator=gen, dtype=torch.float64).add(0.01).sort(1).values
    a, d = S.hill_alpha(lam, method="ks")
    for b in range(3):
        x = lam[b]
        best = (math.inf, None)
        for i in range(len(x) - 1):  # the seed's O(n²) loop, as reference
            n = len(x) - i
            al = 1 + n / (x[i:].log().sum() - n * x[i].log())
            dd = (1 - (x[i:] / x[i]) ** (1 - al) - torch.arange(n, dtype=x.dtype) / n).abs().max()
            if al > 1 and dd < best[0]:
                best = (float(dd), float(al))
        assert float(d[b]) == pytest.approx(best[0], rel=1e-6)
        assert float(a[b]) == pytest.approx(best[1], rel=1e-6)


def _spiked(m, n, spikes, seed=0):
    """Noise (m, n) with entries N(0, 1/max) whose top singular values are replaced by ``spikes`` (λ = σ²)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(m, n, generator=gen, dtype=torch.float64) / math.sqrt(max(m, n))
    u, s, vh = torch.linalg.svd(z, full_matrices=False)
    s = s.clone()
    s[: len(spikes)] = torch.tensor(spikes, dtype=torch.float64).sqrt()
    return (u * s) @ vh


def test_mp_spikes_counts_planted_spikes_and_quantile_and_robust_beat_mean():
    w = _spiked(128, 64, [60.0, 40.0, 8.0, 6.0, 5.0])
    lam = S.eigenvalues([w])[0]
    default, edge_d = S.mp_spikes(lam, 128, 64)
    robust, edge_r = S.mp_spikes(lam, 128, 64, sigma_mp="robust")
    mean, edge_m = S.mp_spikes(lam, 128, 64, sigma_mp="mean")
    assert int(default) == 5 and int(robust) == 5
    assert int(mean) < 5 and float(edge_m) > max(float(edge_r), float(edge_d))  # spikes inflate the mean edge


@pytest.mark.parametrize("m, n", [(400, 400), (800, 200)])
@pytest.mark.parametrize("p", [0.25, 0.5, 0.75, 0.9])
def test_mp_quantile_matches_sampled_noise(m, n, p):
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(m, n, generator=gen, dtype=torch.float64) / math.sqrt(max(m, n))
    lam = torch.linalg.svdvals(z).square()
    ratio = min(m, n) / max(m, n)
    assert S.mp_quantile(ratio, p) == pytest.approx(float(torch.quantile(lam, p)), rel=0.03)
    with pytest.raises(ValueError, match="ratio"):
        S.mp_quantile(1.5, p)


@pytest.mark.parametrize("sigma_mp", ["quantile", "robust", "mean"])
def test_mp_pure_noise_has_no_spikes(sigma_mp):
    w = _spiked(96, 48, [], seed=3)
    lam = S.eigenvalues([w])[0]
    for tw in (True, False):
        k, edge = S.mp_spikes(lam, 96, 48, sigma_mp=sigma_mp, tracy_widom=tw)
        assert int(k) <= (0 if tw else 1)
    # scale invariance of the whole count (the seed's TW margin was not)
    assert int(S.mp_spikes(lam * 1e-4, 96, 48, sigma_mp=sigma_mp)[0]) == 0


def test_eigenvalues_batched_equals_per_matrix():
    mats = [torch.randn(12, 7), torch.randn(12, 7), torch.randn(5, 9), torch.randn(3, 12, 7)]
    got = S.eigenvalues(mats)
    for m, g in zip(mats, got, strict=True):
        ref = torch.linalg.svdvals(m).flatten().square().sort().values
        torch.testing.assert_close(g, ref)


class _TwoBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(48, 96)
        self.b = nn.Linear(96, 48)
        self.c = nn.Linear(48, 48)
        self.d = nn.Linear(48, 96)
        with torch.no_grad():
            # plant structure: a strong power-law tail in ``a`` (heavy-tailed -> small α, low rank)
            self.a.weight.copy_(_matrix_with_eigs(_power_law_eigs(2.0, 48), 96, 48).float())
            self.c.weight.copy_(_spiked(48, 48, [30.0, 20.0, 10.0]).float())

    def forward(self, x):
        return self.d(self.c(self.b(self.a(x))))


@pytest.mark.parametrize("scaling", ["linear", "log", "sqrt"])
def test_allocation_ranks_ordered_by_score_and_bounded(scaling):
    model = _TwoBlock()
    rows = S.spectral_table(model, layer_selection_percentile=1.0, minimum_rank=2, maximum_rank=16,
                            rank_scaling_method=scaling)
    by = {r.name: r for r in rows}
    assert by["c"].spikes == 3 and by["a"].alpha < by["b"].alpha
    ranks = [r.rank for r in sorted(rows, key=lambda r: r.score)]
    assert ranks == sorted(ranks) and min(ranks) == 2 and max(ranks) == 16
    assert all(r.lora_alpha == 2.0 * r.rank for r in rows)
    half = S.spectral_table(model, layer_selection_percentile=0.5)
    chosen = {r.name for r in half if r.selected}
    best = sorted(half, key=lambda r: -r.score)[:2]
    assert chosen == {r.name for r in best}


@pytest.mark.parametrize("p, n_largest, n_smallest", [(0.5, 2, 2), (0.6, 3, 2), (0.2, 1, 1)])
def test_selection_largest_ceil_and_smallest_int(p, n_largest, n_smallest):
    model = _TwoBlock()  # four scored layers
    for selection, count, sign in (("largest", n_largest, -1), ("smallest", n_smallest, 1)):
        rows = S.spectral_table(model, layer_selection_percentile=p, selection=selection)
        chosen = {r.name for r in rows if r.selected}
        assert chosen == {r.name for r in sorted(rows, key=lambda r: sign * r.score)[:count]}, selection
        assert all(r.rank >= 4 for r in rows if r.selected) and all(r.rank == 0 for r in rows if not r.selected)
    with pytest.raises(ValueError, match="selection"):
        S.spectral_table(model, selection="top")


class Conv1D(nn.Module):
    """transformers' ``Conv1D`` layout (``weight (in, out)``), without importing transformers."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))


def test_conv1d_layers_are_analysed_as_out_by_in():
    model = nn.Module()
    model.lin = nn.Linear(24, 40)
    model.conv = Conv1D(40, 24)  # in 24 -> out 40, stored (24, 40)
    with torch.no_grad():
        model.conv.weight.copy_(model.lin.weight.t())
    rows = {r.name: r for r in S.spectral_analysis(model)}
    assert rows["conv"].shape == rows["lin"].shape == (40, 24)
    assert rows["conv"].alpha == pytest.approx(rows["lin"].alpha, rel=1e-5)
    assert rows["conv"].spikes == rows["lin"].spikes


def test_config_round_trips_through_peft():
    peft = pytest.importorskip("peft")
    model = vit_tiny(dim=32, depth=2, heads=4)
    table = []
    cfg = S.adaptive_lora_config(model, table=table, layer_selection_percentile=0.5, minimum_rank=2,
                                 maximum_rank=8, exclude_modules=["head"], lora_dropout=0.0)
    assert isinstance(cfg, peft.LoraConfig)
    selected = {r.name: r for r in table if r.selected}
    assert "head" not in {r.name for r in table} and len(selected) == math.ceil(0.5 * 8)
    x = torch.randn(3, 1, 8, 8)
    ref = model(x)
    pm = peft.get_peft_model(model, cfg)
    torch.testing.assert_close(pm(x), ref)  # LoRA B starts at zero
    adapted = {}
    for name, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            r = mod.lora_A["default"].weight.shape[0]
            adapted[name.removeprefix("base_model.model.")] = (r, mod.scaling["default"])
    assert set(adapted) == set(selected)
    for name, (r, scale) in adapted.items():
        assert r == selected[name].rank
        assert scale == pytest.approx(2.0)
    # ``model`` is now wrapped in place by PEFT: the analysis sees through to the base layers
    rp, ap, regex = S.get_adaptive_lora_config(model, layer_selection_percentile=0.5, minimum_rank=2,
                                               maximum_rank=8, exclude_modules=["head"])
    assert set(rp) == set(cfg.rank_pattern) and regex == cfg.target_modules


def test_rslora_alpha_keeps_effective_scale_and_dora_passes_through():
    peft = pytest.importorskip("peft")
    model = vit_tiny(dim=32, depth=1, heads=2)
    cfg = S.adaptive_lora_config(model, use_rslora=True, use_dora=True, minimum_rank=2, maximum_rank=8,
                                 layer_selection_percentile=1.0, exclude_modules=["head", "patch_embed"])
    assert cfg.use_rslora and cfg.use_dora
    pm = peft.get_peft_model(model, cfg)
    scales = [m.scaling["default"] for m in pm.modules() if hasattr(m, "scaling") and "default" in m.scaling]
    assert scales and all(s == pytest.approx(2.0) for s in scales)


class _FakeQuantLinear(nn.Module):
    """HQQ-style: int8 codes + per-row scale, a module-level ``dequantize()``."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        scale = w.abs().amax(1, keepdim=True) / 127
        self.register_buffer("weight", torch.round(w / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def dequantize(self):
        return self.weight.float() * self.scale


class _Params4bitLike(nn.Parameter):
    """bitsandbytes-style packed weight: uint8 storage with a ``quant_state`` and its own dequantize."""

    def __new__(cls, data, quant_state):
        p = super().__new__(cls, data, requires_grad=False)
        p.quant_state = quant_state
        return p

    def dequantize(self):
        return (self.data.float() - 128) * self.quant_state


class _BnbLikeLinear(nn.Linear):
    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features)
        w = linear.weight.detach()
        scale = w.abs().amax(1, keepdim=True) / 127
        self.weight = _Params4bitLike((torch.round(w / scale) + 128).to(torch.uint8), scale)

    def forward(self, x):  # pragma: no cover - not run; only analysed
        raise NotImplementedError


@pytest.mark.parametrize("kind", ["module", "bnb"])
def test_quantized_base_is_analysed_from_dequantized_weights(kind):
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 48))
    quant = nn.Sequential(*[(_FakeQuantLinear(m) if kind == "module" else _BnbLikeLinear(m))
                            if isinstance(m, nn.Linear) else m for m in ref])
    deq = nn.Sequential(*[nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 48)])
    with torch.no_grad():
        for d, q in zip([deq[0], deq[2]], [quant[0], quant[2]], strict=True):
            d.weight.copy_(S.dequantized_weight(q))
    got = S.spectral_analysis(quant)
    want = S.spectral_analysis(deq)
    assert [r.name for r in got] == ["0", "2"]
    for g, w in zip(got, want, strict=True):
        assert g.alpha == pytest.approx(w.alpha) and g.spikes == w.spikes
    # and the de-quantized weights are close to the original float ones (not the integer codes)
    torch.testing.assert_close(S.dequantized_weight(quant[0]), ref[0].weight.detach(), atol=2e-3, rtol=0)


def test_packed_weights_without_dequantize_are_rejected():
    class Packed(nn.Linear):
        pass

    m = Packed(8, 8)
    m.weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="packed"):
        S.spectral_analysis(nn.Sequential(m))


def test_conv_layers_optional():
    model = nn.Sequential(nn.Conv2d(16, 32, 3), nn.Flatten(), nn.Linear(32, 20))
    assert [r.name for r in S.spectral_analysis(model)] == ["2"]
    rows = S.spectral_analysis(model, include_conv=True)
    assert [r.name for r in rows] == ["0", "2"] and rows[0].num_eigs == 9 * 16


def test_argument_errors():
    model = _TwoBlock()
    with pytest.raises(ValueError, match="rank_scaling_method"):
        S.spectral_table(model, rank_scaling_method="cubic")
    with pytest.raises(ValueError, match="layer_selection_percentile"):
        S.spectral_table(model, layer_selection_percentile=0.0)
    with pytest.raises(ValueError, match="minimum_rank"):
        S.spectral_table(model, minimum_rank=8, maximum_rank=4)
    with pytest.raises(ValueError, match="method"):
        S.hill_alpha(torch.rand(10).sort().values, method="mle")
    with pytest.raises(ValueError, match="no Linear"):
        S.spectral_analysis(nn.Sequential(nn.ReLU()))


@pytest.mark.gpu
def test_analysis_on_cuda_matches_cpu():
    model = _TwoBlock().double()  # fp64: no near-tie in the KS scan flips between devices
    cpu = S.spectral_analysis(model)
    gpu = S.spectral_analysis(model.cuda())
    for c, g in zip(cpu, gpu, strict=True):
        assert c.name == g.name and c.spikes == g.spikes
        assert g.alpha == pytest.approx(c.alpha, rel=1e-3)


def test_host_syncs_do_not_grow_with_the_number_of_equal_layers():
    from lowrank_kernels.testing import count_gpu_cost

    torch.manual_seed(0)
    S.mp_quantile(16 / 48, 0.75)  # cached per aspect ratio: computed once, on the first call
    syncs = []
    for n in (2, 8):  # (48, 16) noise: no eigenvalue near zero, so every layer keeps all 16 for the fit
        model = nn.Sequential(*[nn.Linear(16, 48) if i % 2 == 0 else nn.Linear(48, 16) for i in range(n)])
        for sigma_mp in ("quantile", "mean"):
            with count_gpu_cost() as cost:
                rows = S.spectral_analysis(model, sigma_mp=sigma_mp)
            assert len(rows) == n
            syncs.append(cost.syncs)
    assert syncs[:2] == syncs[2:], syncs  # one batched pass per shape group, one host read per statistic
