"""RankController: exact resizes, optimizer-state remap, hysteresis, checkpoints, JSONL log, DDP, demo spike."""

import copy
import json
import os
import socket
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowrank_kernels.app.models import TinyGPT
from lowrank_kernels.nn import LowRankLinear, replace_linear
from lowrank_kernels.rank import RankController, ResizeEvent, rewrap_ddp
from lowrank_kernels.testing import assert_verbose_allclose


def _mlp(dtype=torch.float32, r1=6, r2=5):
    return nn.Sequential(LowRankLinear(12, 16, r1, dtype=dtype), nn.GELU(), LowRankLinear(16, 10, r2, dtype=dtype))


def _train_steps(model, opt, n, x, y, controller=None):
    losses, events = [], []
    for _ in range(n):
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if controller is not None:
            events += controller.step()
    return losses, events


def _product(m):
    return m.U.detach().double() @ m.V.detach().double()


# ------------------------------------------------------------------------------------- resize math
@pytest.mark.parametrize("old, new", [(3, 7), (5, 6)])
def test_grow_keeps_function_exactly(old, new):
    model = nn.Sequential(LowRankLinear(9, 11, old, dtype=torch.float64))
    x = torch.randn(4, 9, dtype=torch.float64)
    before = model(x)
    events = RankController(model, None, min_rank=1).apply({"0": new})
    assert [(e.layer, e.old_rank, e.new_rank) for e in events] == [("0", old, new)]
    assert model[0].rank == new
    assert_verbose_allclose(model(x), before, atol=1e-12, rtol=1e-12, name="output after grow")


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_shrink_is_best_rank_k(dtype, atol):
    model = nn.Sequential(LowRankLinear(14, 10, 8, dtype=dtype))
    w = _product(model[0])
    RankController(model, None, min_rank=1).apply({"0": 3})
    u, s, vh = torch.linalg.svd(w)
    best = (u[:, :3] * s[:3]) @ vh[:3]
    assert_verbose_allclose(_product(model[0]), best, atol=atol, name="U V after shrink")
    err = torch.linalg.matrix_norm(_product(model[0]) - w)
    assert abs(err.item() - s[3:].square().sum().sqrt().item()) < atol * 10  # Eckart-Young error


def _adamq3r(params, model):
    from lowrank_kernels.q3r import AdamQ3R

    head = nn.Linear(10, 10)  # Q3R regularises nn.Linear weights; the factors get its plain AdamW path
    return AdamQ3R(list(params) + list(head.parameters()), {head: None}, target_rank=0.5, lmbda=0.0, lr=1e-2)


OPTIMIZERS = {
    "adam": lambda ps, m: torch.optim.Adam(ps, lr=1e-2),
    "adamw_amsgrad_foreach": lambda ps, m: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True, foreach=True),
    "adamw_single_tensor": lambda ps, m: torch.optim.AdamW(ps, lr=1e-2, foreach=False),
    "sgd_momentum": lambda ps, m: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
    "adamq3r": _adamq3r,
}


@pytest.mark.parametrize("policy", ["carry", "reset"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_optimizer_steps_after_resize_with_param_identity(opt_name, policy):
    model = _mlp()
    opt = OPTIMIZERS[opt_name](model.parameters(), model)
    ids = [id(p) for p in model.parameters()]
    x, y = torch.randn(32, 12), torch.randn(32, 10)
    _train_steps(model, opt, 3, x, y)
    ctrl = RankController(model, opt, min_rank=1, state_policy=policy)
    for ranks in ({"0": 9, "2": 3}, {"0": 4, "2": 7}):
        ctrl.apply(ranks)
        assert [id(p) for p in model.parameters()] == ids
        assert {id(p) for g in opt.param_groups for p in g["params"]} >= set(ids)
        for name, m in ctrl.layers.items():
            assert m.rank == ranks[name]
            for p in (m.U, m.V):
                state = opt.state.get(p, {})
                if policy == "reset":
                    assert not state
                for v in state.values():
                    if isinstance(v, torch.Tensor) and v.dim() > 0:
                        assert v.shape == p.shape
        before = [p.detach().clone() for p in model.parameters()]
        losses, _ = _train_steps(model, opt, 2, x, y)
        assert all(torch.isfinite(torch.tensor(losses)))
        assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def _dense_grad(layer, x, y):
    """dL/dW for W = U V (and the factor gradients it implies)."""
    w = (layer.U.detach() @ layer.V.detach()).requires_grad_(True)
    F.mse_loss(F.linear(x, w, layer.bias), y, reduction="sum").backward()
    return w.grad


@pytest.mark.parametrize("new", [9, 3])
def test_moments_follow_the_change_of_basis(new):
    torch.manual_seed(1)
    layer = LowRankLinear(10, 12, 6, dtype=torch.float64)
    model = nn.Sequential(layer)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(7, 10, dtype=torch.float64), torch.randn(7, 12, dtype=torch.float64)
    gw = _dense_grad(layer, x, y)
    U0, V0 = layer.U.detach().clone(), layer.V.detach().clone()
    sq_u, sq_v = torch.rand(12, 6, dtype=torch.float64), torch.rand(6, 10, dtype=torch.float64)
    opt.state[layer.U] = {"step": torch.tensor(5.0), "exp_avg": gw @ V0.t(), "exp_avg_sq": sq_u.clone()}
    opt.state[layer.V] = {"step": torch.tensor(5.0), "exp_avg": U0.t() @ gw, "exp_avg_sq": sq_v.clone()}
    info_right, info_left = None, None

    ctrl = RankController(model, opt, min_rank=1)
    orig_resize = layer.resize

    def spy(k):
        nonlocal info_right, info_left
        info = orig_resize(k)
        info_right, info_left = info.right.clone(), info.left.clone()
        return info

    layer.resize = spy
    ctrl.apply({"0": new})
    k = min(6, new)
    su, sv = opt.state[layer.U], opt.state[layer.V]
    # first moments: exactly the gradients of the new factors w.r.t. the same dL/dW (new directions: zero)
    assert_verbose_allclose(su["exp_avg"][:, :k], (gw @ layer.V.detach().t())[:, :k], atol=1e-10, name="m_U")
    assert torch.all(su["exp_avg"][:, k:] == 0) and torch.all(sv["exp_avg"][k:] == 0)
    assert_verbose_allclose(sv["exp_avg"][:k], (layer.U.detach().t() @ gw)[:k], atol=1e-10, name="m_V")
    # second moments: variances combined with squared coefficients, non-negative, new directions zero
    assert_verbose_allclose(su["exp_avg_sq"], sq_u @ info_right.square(), atol=1e-12, name="v_U")
    assert_verbose_allclose(sv["exp_avg_sq"], info_left.square().t() @ sq_v, atol=1e-12, name="v_V")
    assert (su["exp_avg_sq"] >= 0).all() and (sv["exp_avg_sq"] >= 0).all()
    assert float(su["step"]) == 5.0  # bias correction continues
    if new > 6:  # growing keeps W, so the carried moment equals the true gradient of the new factors
        layer.resize = orig_resize
        F.mse_loss(model(x), y, reduction="sum").backward()
        assert_verbose_allclose(su["exp_avg"][:, :k], layer.U.grad[:, :k], atol=1e-10, name="m_U vs grad")
        assert_verbose_allclose(sv["exp_avg"], layer.V.grad * (torch.arange(new) < k)[:, None], atol=1e-10,
                                name="m_V vs grad")


def test_unknown_state_key_is_reset_with_warning():
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train_steps(model, opt, 1, torch.randn(8, 12), torch.randn(8, 10))
    U = model[0].U
    opt.state[U]["mystery"] = torch.ones_like(U)
    with pytest.warns(RuntimeWarning, match="mystery"):
        RankController(model, opt, min_rank=1).apply({"0": 4})
    assert U not in opt.state and opt.state[model[0].V]["exp_avg"].shape == (4, 12)


# ---------------------------------------------------------------------------------- decision rule
def test_hysteresis_wobble_inside_band_never_resizes():
    model = nn.Sequential(LowRankLinear(64, 64, 16))
    ctrl = RankController(model, None, min_rank=4, safety_factor=1.5, ema_decay=0.5, grow_threshold=0.15,
                          shrink_threshold=0.25)
    # target = 1.5 * sr wobbles in [13.5, 18] around the rank 16: band is [12, 18.4]
    for i in range(60):
        assert ctrl.decide([9.0 if i % 2 else 12.0]) == {}
    assert 12 < ctrl.ema["0"] < 18.4
    # the same wobble around a lower level leaves the band (shrink) once the EMA has moved
    decisions = [ctrl.decide([6.0 if i % 2 else 8.0]) for i in range(10)]
    assert any(d.get("0", 16) < 16 for d in decisions)


def test_max_step_and_bounds():
    model = nn.Sequential(LowRankLinear(40, 48, 8))
    ctrl = RankController(model, None, min_rank=5, max_rank=30, ema_decay=0.0, max_step=4,
                          grow_threshold=0.05, shrink_threshold=0.1)
    ranks = [8]
    for _ in range(8):  # stable rank 40 -> target clamps at max_rank=30
        ctrl.apply(ctrl.decide([40.0]))
        ranks.append(model[0].rank)
    assert ranks == [8, 12, 16, 20, 24, 28, 30, 30, 30]
    for _ in range(8):  # stable rank ~0 -> target clamps at min_rank=5
        ctrl.apply(ctrl.decide([0.1]))
        ranks.append(model[0].rank)
    assert ranks[8:] == [30, 26, 22, 18, 14, 10, 6, 5, 5]
    assert all(abs(a - b) <= 4 for a, b in zip(ranks, ranks[1:], strict=False))


def test_interval_warmup_and_estimate_is_exact():
    torch.manual_seed(0)
    model = _mlp(torch.float64)
    ctrl = RankController(model, None, min_rank=1, interval=3, warmup=4)
    called = []
    ctrl._estimate_list = lambda orig=ctrl._estimate_list: called.append(ctrl.num_steps) or orig()
    for _ in range(12):
        ctrl.step()
    assert called == [6, 9, 12]
    m = model[0]
    s = torch.linalg.svdvals(_product(m))
    exact = (s.square().sum() / s[0].square()).item()
    assert abs(RankController(model, None, min_rank=1).estimate()[0].item() - exact) < 1e-4 * exact


def test_invalid_arguments():
    model = _mlp()
    with pytest.raises(ValueError, match="state_policy"):
        RankController(model, None, state_policy="keep")
    with pytest.raises(ValueError, match="max_rank"):
        RankController(model, None, min_rank=8, max_rank=4)
    with pytest.raises(ValueError, match="no LowRankLinear"):
        RankController(nn.Linear(3, 3), None)
    with pytest.raises(ValueError, match="not found"):
        RankController(model, None, layers=["nope"])
    with pytest.raises(ValueError, match="expected 2 stable ranks"):
        RankController(model, None).decide([1.0])
    with pytest.raises(ValueError, match="unknown layers"):
        RankController(model, None).apply({"1": 3})
    with pytest.raises(ValueError, match=r"layer '2' \(16 -> 10\) cannot take rank 11"):
        RankController(model, None).apply({"0": 3, "2": 11})
    assert model[0].rank == 6  # checked before anything is resized


def _blocks(depth, dim=32, rank=8, mixed=False):
    """The LowRankLinear layers of ``depth`` transformer blocks (qkv, proj, fc1, fc2); ``mixed``: ranks 8/6/5 in
    turn, so layers of one shape carry different ranks (as after some resizes)."""
    layers = nn.ModuleDict()
    for i in range(depth):
        for name, (i_f, o_f) in {"qkv": (dim, 3 * dim), "proj": (dim, dim), "fc1": (dim, 4 * dim),
                                 "fc2": (4 * dim, dim)}.items():
            r = (rank, rank - 2, rank - 3)[i % 3] if mixed else rank
            layers[f"b{i}_{name}"] = LowRankLinear(i_f, o_f, r)
    return layers


def _decision_cost(depth, mixed):
    from lowrank_kernels.testing import count_gpu_cost

    torch.manual_seed(0)
    layers = _blocks(depth, mixed=mixed)
    # a band so wide that no layer resizes: the cost of the decision itself
    ctrl = RankController(layers, None, min_rank=1, interval=1, grow_threshold=10.0, shrink_threshold=0.99)
    ctrl.step()
    with count_gpu_cost() as cost:
        events = ctrl.step()
    assert events == []
    return cost


@pytest.mark.parametrize("mixed", [False, True])
def test_decision_gpu_cost_does_not_grow_with_layers(mixed):
    """Issue 15.5: stable ranks batched per shape group, one host read of them (plus the batched eigensolver's
    error check): <= 60 launches and <= 2 syncs over 48 layers, at most 1.5x the launches of 12 layers. (The
    per-layer estimate of before: 94 -> 310 launches, 15 -> 51 syncs.)"""
    small, large = _decision_cost(3, mixed), _decision_cost(12, mixed)
    print(f"12 layers: {small.launches} launches, {small.syncs} syncs; "
          f"48 layers: {large.launches} launches, {large.syncs} syncs")
    assert large.launches <= 60, large.ops
    assert large.syncs <= 2 and small.syncs <= 2
    assert large.launches <= 1.5 * small.launches, (small.ops, large.ops)


def test_batched_decisions_equal_per_layer_estimates():
    """The batched estimate equals each layer's exact stable rank (fp64 SVD of U V), mixed ranks and shapes
    interleaved, and a controller fed those per-layer values decides exactly as one that estimates them."""
    torch.manual_seed(3)
    layers = _blocks(3, dim=16, rank=6, mixed=True)
    with torch.no_grad():
        layers["b1_fc1"].U.mul_(torch.linspace(0.01, 3, layers["b1_fc1"].rank))  # a decaying spectrum
        layers["b2_proj"].V[1:].zero_()  # rank 1
    exact = []
    for m in layers.values():
        s = torch.linalg.svdvals(_product(m))
        exact.append((s.square().sum() / s[0].square()).item())
    kw = dict(min_rank=1, interval=1, safety_factor=1.2, ema_decay=0.0, grow_threshold=0.05,
              shrink_threshold=0.05)
    ctrl = RankController(layers, None, **kw)
    got = ctrl.estimate()
    assert_verbose_allclose(got, torch.tensor(exact, dtype=torch.float64), rtol=1e-5, name="stable ranks")
    reference = RankController(copy.deepcopy(layers), None, **kw)
    assert ctrl.decide(got) == reference.decide(exact)
    assert ctrl.ema == pytest.approx(reference.ema, rel=1e-6)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("factor", ["U", "V"])
def test_non_finite_factor_names_the_layer(value, factor):
    """Issue 17.4: NaN/Inf in a factor is a ValueError naming the layer, not a LinAlgError from the solver."""
    layers = _blocks(2, dim=16, rank=4)
    with torch.no_grad():
        getattr(layers["b1_fc1"], factor)[0, 1] = value
    ctrl = RankController(layers, None, min_rank=1, interval=1)
    with pytest.raises(ValueError, match=r"b1_fc1.*NaN or Inf"):
        ctrl.step()
    ranks = ctrl.ranks
    with pytest.raises(ValueError, match="b1_fc1"):
        ctrl.apply({"b0_qkv": 2})  # the estimate behind the events is checked too; nothing was resized
    assert ctrl.ranks == ranks


def _trained_blocks(dtype):
    torch.manual_seed(5)
    layers = _blocks(2, dim=12, rank=6).to(dtype)
    layers["b0_fc2"] = LowRankLinear(48, 12, 5, dtype=dtype)  # another rank: a group of its own (per-layer path)
    opt = torch.optim.AdamW(layers.parameters(), lr=1e-2, amsgrad=True)
    x = torch.randn(16, 12, dtype=dtype)
    for _ in range(3):
        loss = sum(m(x if m.in_features == 12 else torch.randn(16, m.in_features, dtype=dtype)).square().mean()
                   for m in layers.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return layers, opt


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("new", [4, 9])
def test_resize_many_equals_per_layer_resize(dtype, atol, new):
    """Batched resizes (groups of one shape and rank change) give the per-layer result: the same factors and
    maps when shrinking, the same kept part and an exact function when growing, the same optimizer moments;
    Parameter objects kept, each with storage of its own."""
    from lowrank_kernels.rank import resize_many, resize_with_state

    layers, opt = _trained_blocks(dtype)
    ref_layers, ref_opt = copy.deepcopy((layers, opt))
    names = list(layers)
    ids = [id(p) for p in layers.parameters()]
    products = {n: _product(m) for n, m in layers.items()}
    infos = resize_many([layers[n] for n in names], [new] * len(names), opt, "carry")
    ref_infos = [resize_with_state(ref_layers[n], new, ref_opt, "carry") for n in names]
    assert [id(p) for p in layers.parameters()] == ids
    ptrs = [p.untyped_storage().data_ptr() for p in layers.parameters()]
    assert len(set(ptrs)) == len(ptrs), "resized parameters must not share storage"
    for n, info, ref in zip(names, infos, ref_infos, strict=True):
        m, r = layers[n], ref_layers[n]
        k = min(info.old_rank, new)
        assert m.rank == new and m.U.dtype == dtype
        assert_verbose_allclose(m.U[:, :k], r.U[:, :k], atol=atol, name=f"{n}.U")
        assert_verbose_allclose(m.V[:k], r.V[:k], atol=atol, name=f"{n}.V")
        for field in ("left", "right", "singular_values"):
            assert_verbose_allclose(getattr(info, field), getattr(ref, field), atol=atol, name=f"{n}.{field}")
        for p, q in ((m.U, r.U), (m.V, r.V)):
            for key, value in opt.state[p].items():
                want = ref_opt.state[q][key]
                if value.dim() and new > info.old_rank and p is m.V:  # added rows: zero in both
                    value, want = value[:k], want[:k]
                assert_verbose_allclose(value, want, atol=atol, name=f"{n} {key}")
        if new > info.old_rank:  # growing keeps U V; the added rows are orthogonal to the kept ones
            assert_verbose_allclose(_product(m), products[n], atol=atol * 10, name=f"{n} U V after grow")
            added = m.V.detach().double()[k:]
            assert torch.linalg.matrix_norm(added @ m.V.detach().double()[:k].t()) < atol * 100


def test_resize_gpu_cost_does_not_grow_with_layers():
    """Resizing every layer (estimate + batched resize + batched moment remap): the launch count is set by
    the number of shape groups, not of layers."""
    from lowrank_kernels.testing import count_gpu_cost

    costs = []
    for depth in (3, 12):
        torch.manual_seed(0)
        layers = _blocks(depth)
        opt = torch.optim.AdamW(layers.parameters(), lr=1e-3)
        for p in layers.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        ctrl = RankController(layers, opt, min_rank=1)
        with count_gpu_cost() as cost:
            events = ctrl.apply({name: 6 for name in ctrl.layers})
        assert len(events) == 4 * depth
        costs.append(cost)
    print([(c.launches, c.syncs) for c in costs])
    assert costs[1].launches <= 1.05 * costs[0].launches and costs[1].syncs <= costs[0].syncs


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_controller_on_cuda(dtype, atol):
    model = _mlp().to("cuda", dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = torch.randn(32, 12, device="cuda", dtype=dtype), torch.randn(32, 10, device="cuda", dtype=dtype)
    _train_steps(model, opt, 3, x, y)
    ctrl = RankController(model, opt, min_rank=1, interval=1)
    with torch.no_grad():
        before = model(x)
    ctrl.apply({"0": 9, "2": 7})
    with torch.no_grad():
        assert_verbose_allclose(model(x), before, atol=atol, rtol=atol, name="output after grow")
    _train_steps(model, opt, 3, x, y, ctrl)
    for p in model.parameters():
        for v in opt.state[p].values():
            if v.dim() > 0:  # ("step" stays a CPU scalar in torch's non-capturable AdamW)
                assert v.device.type == "cuda" and v.shape == p.shape


# ------------------------------------------------------------------------------- log and resume
def test_jsonl_log_matches_events(tmp_path):
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    log = tmp_path / "ranks.jsonl"
    ctrl = RankController(model, opt, min_rank=2, interval=2, safety_factor=1.0, ema_decay=0.3, log_file=log)
    _, events = _train_steps(model, opt, 12, torch.randn(32, 12), torch.randn(32, 10), ctrl)
    events += ctrl.apply({"2": 7})
    assert events and all(isinstance(e, ResizeEvent) for e in events)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines == [e.to_dict() for e in events]
    assert set(lines[0]) == {"layer", "old_rank", "new_rank", "stable_rank", "ema", "step"}


def test_state_dict_resume_is_exact():
    x, y = torch.randn(32, 12), torch.randn(32, 10)
    kw = dict(min_rank=2, interval=2, safety_factor=2.5, ema_decay=0.5, grow_threshold=0.05)

    def make(seed):
        torch.manual_seed(seed)
        model = _mlp(r1=4, r2=3)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
        return model, opt, RankController(model, opt, **kw)

    model, opt, ctrl = make(0)
    _, ev_a = _train_steps(model, opt, 10, x, y, ctrl)
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "ctrl": ctrl.state_dict(),
                          "rng": torch.get_rng_state()})
    _, ev_b = _train_steps(model, opt, 10, x, y, ctrl)
    assert ev_a and ev_b and any(e.new_rank > e.old_rank for e in ev_b)  # grows draw random directions

    model2, opt2, ctrl2 = make(123)
    ctrl2.load_state_dict(ckpt["ctrl"])  # first: gives the layers the checkpoint's shapes
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    torch.set_rng_state(ckpt["rng"])
    _, ev_c = _train_steps(model2, opt2, 10, x, y, ctrl2)
    assert ev_c == ev_b
    for (name, p), p2 in zip(model.named_parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, p2), name
    assert ctrl2.state_dict() == ctrl.state_dict()


# ------------------------------------------------------------------------------------------- DDP
def _ddp_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = _mlp(r1=4, r2=3)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    ctrl = RankController(ddp, opt, min_rank=2, interval=2, safety_factor=2.5, ema_decay=0.5, grow_threshold=0.05)
    torch.manual_seed(100 + rank)  # different data and a different RNG stream (grow directions) per rank
    events = []
    for _ in range(13):  # the last step comes after the last decision: plain DDP must keep the ranks in sync
        x, y = torch.randn(16, 12), torch.randn(16, 10)
        loss = F.mse_loss(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        new = ctrl.step()
        if new:
            ddp = rewrap_ddp(ddp)
        events += new
    torch.save({"params": [p.detach() for p in model.parameters()], "events": [e.to_dict() for e in events],
                "ema": ctrl.ema, "state": {k: v for k, v in opt.state[model[0].U].items()}},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gloo_two_processes_identical():
    import torch._dynamo  # noqa: F401  (DDP's first construction imports it: ~5 s per forked child otherwise)
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True, start_method="fork")
        r0, r1 = (torch.load(os.path.join(out, f"rank{i}.pt")) for i in range(2))
    assert r0["events"] and r0["events"] == r1["events"]
    assert any(e["new_rank"] > e["old_rank"] for e in r0["events"])
    assert r0["ema"] == r1["ema"]
    for a, b in zip(r0["params"], r1["params"], strict=True):
        assert torch.equal(a, b)
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k


def _ddp_nan_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = _mlp()
    if rank == 0:  # only the deciding rank sees it: the others must not wait for a broadcast that never comes
        with torch.no_grad():
            model[2].V[0, 0] = float("nan")
    ctrl = RankController(model, None, min_rank=2, interval=1)
    try:
        ctrl.step()
        outcome = "no error"
    except ValueError as exc:
        outcome = f"ValueError: {exc}"
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w", encoding="utf-8") as f:
        f.write(outcome)
    dist.destroy_process_group()


def test_ddp_non_finite_factor_raises_on_every_rank():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_ddp_nan_worker, args=(2, _free_port(), out), nprocs=2, join=True, start_method="fork")
        outcomes = [open(os.path.join(out, f"rank{i}.txt"), encoding="utf-8").read() for i in range(2)]
    for outcome in outcomes:
        assert outcome.startswith("ValueError:") and "['2']" in outcome, outcome


def test_distributed_helpers_are_single_process_noops():
    from lowrank_kernels import distributed

    t = torch.arange(4.0)
    distributed.flat_broadcast([t], src=0)
    assert torch.equal(t, torch.arange(4.0))
    assert distributed.group_src() == 0 and distributed.rank() == 0 and not distributed.is_distributed()
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.dtensor_params(_mlp()) == []


def _fsdp2_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    model = _mlp()
    for m in model:
        if isinstance(m, LowRankLinear):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    try:
        RankController(model, torch.optim.AdamW(model.parameters()), min_rank=2)
        outcome = "accepted"
    except RuntimeError as exc:
        outcome = f"RuntimeError: {exc}"
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w", encoding="utf-8") as f:
        f.write(outcome)
    dist.destroy_process_group()


def test_fsdp2_sharded_model_is_refused_with_the_reason():
    """Issue 19.3: under FSDP2 (fully_shard, DTensor parameters) a resize would change sharded shapes; the
    controller refuses at construction on every rank, naming the layer and the reason."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_fsdp2_worker, args=(2, _free_port(), out), nprocs=2, join=True, start_method="fork")
        outcomes = [open(os.path.join(out, f"rank{i}.txt"), encoding="utf-8").read() for i in range(2)]
    for outcome in outcomes:
        assert outcome.startswith("RuntimeError:"), outcome
        assert "FSDP2" in outcome and "'0'" in outcome and "shapes of U and V" in outcome


# ------------------------------------------------------------------------------ demo loss spike
def _committed_spikes(seed=0):
    """The committed measurement (bench/results/controller-resize-*.json, the README's table) for ``seed``."""
    import json
    from pathlib import Path

    (path,) = (Path(__file__).resolve().parents[1] / "bench" / "results").glob("controller-resize-*.json")
    out = {}
    for resize, row_seed, carry, reset in json.loads(path.read_text())["rows"]:
        if row_seed == seed:
            mode = resize.split()[0]
            out[mode, "carry"], out[mode, "reset"] = carry, reset
    return out


def test_demo_carried_state_spikes_less_than_reset():
    from bench.controller_resize import spikes as measure_spikes

    spikes = measure_spikes(0)
    print({k: round(v, 4) for k, v in spikes.items()})
    for mode in ("grow", "shrink"):
        assert spikes[mode, "carry"] < spikes[mode, "reset"] - 0.03, (mode, spikes)
    assert spikes["grow", "carry"] < 0.05 and spikes["grow", "reset"] > 0.15
    committed = _committed_spikes(0)
    assert len(committed) == 4
    for key, measured in committed.items():  # margins: run-to-run (BLAS) noise, not a new behaviour
        assert abs(spikes[key] - measured) < 0.15, (key, spikes[key], measured)


# ---------------------------------------------------------------------------- causal LM demo model
@pytest.mark.parametrize("lowrank", [False, True])
def test_tiny_gpt_cannot_see_the_future(lowrank):
    model = TinyGPT(vocab_size=40, dim=32, depth=2, heads=4, max_len=16).eval()
    if lowrank:
        replace_linear(model, 8, target_modules=["qkv", "proj", "fc1", "fc2"])
    idx = torch.randint(0, 40, (2, 12))
    with torch.no_grad():
        base = model(idx)
        for t in (0, 5, 10):
            changed = idx.clone()
            changed[:, t + 1] = (changed[:, t + 1] + 1) % 40
            out = model(changed)
            assert_verbose_allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-6, name=f"logits <= {t}")
            assert not torch.allclose(out[:, t + 1], base[:, t + 1])  # the perturbation is visible at t+1


# ------------------------------------------------------------------------------- Trainer callback
def test_trainer_callback_steps_the_controller(tmp_path):
    pytest.importorskip("transformers")
    from transformers import TrainerControl, TrainerState

    from lowrank_kernels.rank import RankControllerCallback

    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cb = RankControllerCallback(min_rank=2, interval=2, safety_factor=1.0, ema_decay=0.3)
    args = type("Args", (), {"world_size": 1, "output_dir": str(tmp_path)})()
    state, control = TrainerState(), TrainerControl()
    cb.on_train_begin(args, state, control, model=model, optimizer=opt)
    x, y = torch.randn(32, 12), torch.randn(32, 10)
    for step in range(1, 11):
        _train_steps(model, opt, 1, x, y)
        state.global_step = step
        cb.on_step_end(args, state, control, model=model, optimizer=opt)
    assert cb.events and cb.controller.num_steps == 10
    assert any(k.startswith("rank/") for entry in state.log_history for k in entry)
    cb.on_save(args, state, control)
    saved = json.loads((tmp_path / "checkpoint-10" / "rank_controller.json").read_text())
    assert saved == json.loads(json.dumps(cb.controller.state_dict()))
    with pytest.raises(NotImplementedError):
        RankControllerCallback().on_train_begin(type("A", (), {"world_size": 2})(), state, control, model=model)
