"""Q3R / AdamQ3R on FSDP2 (``fully_shard``: DTensor weights sharded by rows) with gloo, 2 CPU processes.

The parameters after 7 steps (rebuilds at steps 1, 4 and 7: one exact, two warm or cold randomized) must equal
those of the single-process run in fp64, for a model whose fused QKV weight has a slice that straddles the
shard boundary. A run resumed from a state saved under FSDP2 after 4 steps must end where the uninterrupted run
ends; the bytes all-reduced per step must be the thin products only, never a weight; the saved Q3R state is
the single-process one.
"""

import os
import warnings

import pytest
import torch
from torch import nn

from lowrank_kernels import AdamQ3R
from lowrank_kernels.adapters.spectral import eigenvalues
from lowrank_kernels.q3r import sharded
from lowrank_kernels.testing import exit_worker, run_processes

STEPS = 7  # steps=3: rebuilds at calls 1, 4 and 7
SPLIT = 4  # the resumed run saves after this many steps
# The maths on the shards (sharded.REBUILD = "sharded"): "warm": the wide layer's flat spectrum fails the warm
# rebuilds' check (refinement, exact SVD, widening); "cold": randomized rebuilds from the seeded sketch; "decay": a
# decaying spectrum, where warm rebuilds pass. "auto": as "warm" with the default choice, which gathers the rows of
# these small operators (cheaper here) and rebuilds them with Q3R's own single-process code.
# "fp32": as "warm" in fp32 (to 1e-4).
CONFIGS = {"warm": dict(warm_start=True), "cold": dict(warm_start=False, n_iter=2), "auto": dict(warm_start=True),
           "fp32": dict(warm_start=True),
           "decay": dict(warm_start=True, epsilon_schedule="exploration")}  # decay last: its run goes on below


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        # 27 output rows: 14 on rank 0, 13 on rank 1; slice (9, 18) straddles the boundary, slices are 9 x 8 (tall:
        # the Gram path of the exact rebuild)
        self.qkv = nn.Linear(8, 27)
        # 11 rows: 6 | 5, slice (4, 10) straddles, row 10 is in no slice (decay only); slices 4 x 27 and 6 x 27
        # (wide: the exact rebuild all-gathers their rows)
        self.out = nn.Linear(27, 11)
        self.wide = nn.Linear(144, 144)  # min(m, n) > 128: randomized (warm or cold sketch) rebuilds

    def forward(self, x, z):
        return self.out(torch.tanh(self.qkv(x))), self.wide(z)


def _data():
    g = torch.Generator().manual_seed(1)
    kw = dict(generator=g, dtype=torch.float64)
    return torch.randn(16, 8, **kw), torch.randn(16, 11, **kw), torch.randn(16, 144, **kw)


def _make(config: str, shard: bool):
    sharded.REBUILD = "auto" if config == "auto" else "sharded"
    torch.manual_seed(0)
    net = _Net() if config == "fp32" else _Net().double()
    if config == "decay":
        with torch.no_grad():
            g = torch.Generator().manual_seed(2)
            q1, q2 = (torch.linalg.qr(torch.randn(144, 144, generator=g, dtype=torch.float64)).Q for _ in range(2))
            net.wide.weight.copy_(q1 * (2.0 * torch.exp(-torch.arange(144.0, dtype=torch.float64) / 12)) @ q2.T)
    if shard:
        from torch.distributed.fsdp import fully_shard

        for m in (net.qkv, net.out, net.wide):
            fully_shard(m)
        fully_shard(net)
    tm = {net.qkv: [(0, 9), (9, 18), (18, 27)], net.out: [(0, 4), (4, 10)], net.wide: None}
    opt = AdamQ3R(net.parameters(), tm, target_rank=0.3, lmbda=0.3, steps=3, lr=1e-2, weight_decay=0.01,
                  **CONFIGS[config])
    return net, opt


def _train(net, opt, steps: int) -> None:
    X, Y, Z = (t.to(net.qkv.weight.dtype) for t in _data())
    for _ in range(steps):
        opt.zero_grad()
        y, z = net(X, Z)
        ((y - Y).square().mean() + (z - Z).square().mean()).backward()
        opt.step()


def _full(net) -> list[torch.Tensor]:
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in net.parameters()]


class _Count:
    """Sizes of the tensors handed to ``dist.all_reduce`` and ``dist.all_gather`` (the collectives of Q3R; FSDP2's
    own go through other entry points)."""

    def __init__(self):
        import torch.distributed as dist

        self.dist, self.log = dist, []  # [(numel, bytes), ...] per call
        self.orig = dist.all_reduce, dist.all_gather

    def __enter__(self):
        def reduce(t, *a, **k):
            self.log.append((t.numel(), t.numel() * t.element_size()))
            return self.orig[0](t, *a, **k)

        def gather(out, t, *a, **k):
            self.log.append((t.numel(), t.numel() * t.element_size()))
            return self.orig[1](out, t, *a, **k)

        self.dist.all_reduce, self.dist.all_gather = reduce, gather
        return self

    def __exit__(self, *exc):
        self.dist.all_reduce, self.dist.all_gather = self.orig


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = {}
        for config in CONFIGS:
            net, opt = _make(config, shard=True)
            _train(net, opt, STEPS)
            out[config] = {"params": _full(net), "eps": [op.eps for op in opt.q3r.ops],
                           "ranks": opt.q3r.effective_ranks(), "t": opt.q3r.t,
                           "gathered": opt.q3r.sharded_rebuild.get("gathered")}
        # the collectives of one plain step (8) and one rebuilding step (10) of "decay"
        with _Count() as step_cost:
            _train(net, opt, 1)
        thin = sum(op.k * op.n for op in opt.q3r.ops)
        _train(net, opt, 1)
        with _Count() as rebuild_cost:
            _train(net, opt, 1)
        out["cost"] = {"step": step_cost.log, "rebuild": rebuild_cost.log, "P": thin,
                       "last_rebuild": dict(opt.q3r.sharded_rebuild)}
        # resume: save after SPLIT steps (full model state dict + the optimizer's), load into a fresh sharded run
        net, opt = _make("warm", shard=True)
        _train(net, opt, SPLIT)
        # the model as a full state dict, the optimizer as this process's state (DTensor moments, whole Q3R
        # operators), through a file read back with weights_only=True
        ckpt = os.path.join(out_dir, f"ckpt{rank}.pt")
        torch.save({"model": get_model_state_dict(net, options=StateDictOptions(full_state_dict=True)),
                    "optimizer": opt.state_dict()}, ckpt)
        del net, opt
        saved = torch.load(ckpt, weights_only=True)
        model_sd, opt_sd = saved["model"], saved["optimizer"]
        out["q3r_state"] = opt_sd["q3r"]
        net, opt = _make("warm", shard=True)
        set_model_state_dict(net, model_sd, options=StateDictOptions(full_state_dict=True))
        opt.load_state_dict(opt_sd)
        _train(net, opt, STEPS - SPLIT)
        out["resumed"] = _full(net)
        # a NaN in one process's shard of a gradient: every process skips the step (flags agreed by all-reduce)
        before = [p.to_local().clone() for p in net.parameters()]
        opt.zero_grad()
        y, z = net(*_data()[0::2])
        (y.sum() + z.sum()).backward()
        if rank == 1:
            net.qkv.weight.grad.to_local()[0, 0] = float("nan")
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            opt.step()
        out["nan_skipped"] = all(torch.equal(a, p.to_local()) for a, p in zip(before, net.parameters(), strict=True))
        # spectra of the sharded weights (Gram or gathered rows) = those of the whole weights
        mats = [net.qkv.weight, net.out.weight, net.wide.weight]
        out["eigenvalues"] = (sharded.eigenvalues(mats), eigenvalues([w.full_tensor().detach() for w in mats]))
        # what assembles whole weights refuses sharded ones
        out["refused"] = []
        for what in ("val", "grad"):
            try:
                getattr(opt.q3r, what)
            except TypeError as e:
                out["refused"].append(str(e))
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    exit_worker()


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    run_processes(_worker, 2, (2, str(tmp / "init"), str(tmp)), timeout=120)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _single(config: str, steps: int = STEPS):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net, opt = _make(config, shard=False)
        _train(net, opt, steps)
    finally:
        torch.set_num_threads(n)
    return net, opt


@pytest.mark.parametrize("config", list(CONFIGS))
def test_fsdp_matches_single_process(fsdp_runs, config):
    net, opt = _single(config)
    assert opt.q3r.n_refresh == 3
    for out in fsdp_runs:
        got = out[config]
        assert got["t"] == STEPS
        assert got["gathered"] == (len(opt.q3r.ops) if config == "auto" else 0)
        assert got["ranks"] == opt.q3r.effective_ranks()
        assert got["eps"] == pytest.approx([op.eps for op in opt.q3r.ops], rel=1e-5 if config == "fp32" else 1e-9)
        tol = dict(rtol=1e-4, atol=1e-6) if config == "fp32" else dict(rtol=1e-6, atol=1e-9)
        for a, b in zip(got["params"], net.parameters(), strict=True):
            torch.testing.assert_close(a, b.detach(), **tol)


def test_fsdp_all_reduces_thin_products_only(fsdp_runs):
    for out in fsdp_runs:
        cost = out["cost"]
        # a step: one all-reduce of every operator's P = U^T X (k x n, fp64) and the agreed non-finite flags (a
        # few numbers); FSDP2's own collectives are reduce-scatters and all-gathers, not counted here
        flags = [c for c in cost["step"] if c[0] <= len(list(_Net().parameters()))]
        assert [c for c in cost["step"] if c not in flags] == [(cost["P"], 8 * cost["P"])]
        # (the old host check all-reduces its flags; the device check is agreed by DTensor's found-inf op itself)
        assert len(flags) <= 1
        # a rebuild (warm, refined by subspace iterations where the Ritz check asks for it): Grams and thin
        # (n, l) products, never a whole weight
        biggest = max(b for _, b in cost["rebuild"])
        assert cost["last_rebuild"]["exact"] == cost["last_rebuild"]["gathered"] == 0
        assert 0 < biggest < 144 * 144 * 8, f"a rebuild all-reduced {biggest} bytes at once"


def test_fsdp_resume_and_state(fsdp_runs):
    net, opt = _single("warm")
    ref, _ = _single("warm", SPLIT)
    for out in fsdp_runs:
        for a, b in zip(out["resumed"], net.parameters(), strict=True):
            torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-9)
        # the state saved under FSDP2 holds whole operators, and loads into a single process
        tm = {ref.qkv: [(0, 9), (9, 18), (18, 27)], ref.out: [(0, 4), (4, 10)], ref.wide: None}
        single = AdamQ3R(ref.parameters(), tm, target_rank=0.3, lmbda=0.3, steps=3)
        single.q3r.load_state_dict(out["q3r_state"])
        mine = _single("warm", SPLIT)[1].q3r
        for a, b in zip(single.q3r.ops, mine.ops, strict=True):
            assert a.U.shape == b.U.shape
            # singular vectors up to sign: compare the projectors
            torch.testing.assert_close(a.U @ a.U.T, b.U @ b.U.T, rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(a.S, b.S, rtol=1e-9, atol=1e-12)


def test_fsdp_nonfinite_skip_and_refusals(fsdp_runs):
    for out in fsdp_runs:
        assert out["nan_skipped"], "a NaN in one shard's gradient must make every process skip the step"
        assert len(out["refused"]) == 2
        assert all("FSDP2" in msg and "(27, 8) rows 9:18" in msg for msg in out["refused"]), out["refused"]


def test_fsdp_eigenvalues_without_gathering_tall_weights(fsdp_runs):
    for out in fsdp_runs:
        got, ref = out["eigenvalues"]
        assert [t.numel() for t in got] == [8, 11, 144]
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10 * float(b.max()))
