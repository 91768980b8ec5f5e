"""Spectral (HT-SR) analysis and stable ranks of a model sharded by FSDP2 (``fully_shard``), 2 gloo CPU processes.

Every process must get the single-process table (alphas, spike counts, ranks, LoRA config) of the same model, while
the collectives carry only the Grams ``W^T W (n, n)`` of the tall weights (no all-gather, fewer numbers than the
weights); the sharded stable ranks / spectral norms must equal those of the whole weights, moving only vectors.
"""

import os

import pytest
import torch
from torch import nn

from lowrank_kernels import ops
from lowrank_kernels.adapters import spectral as S
from lowrank_kernels.q3r import sharded
from lowrank_kernels.testing import exit_worker, run_processes

pytest.importorskip("peft")
Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D

# (in, out) per layer: all tall (out > in) so that the Grams are smaller than the weights; 27 / 33 rows split
# unevenly over the 2 processes
LAYERS = [(16, 48), (16, 48), (12, 40), (16, 27), (12, 33), (16, 48)]
# plus a transformers Conv1D (GPT-2 style, weight stored (in, out) = (40, 16), sharded over its 40 input rows)
CONV1D = (40, 16)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in LAYERS)
        self.proj = Conv1D(CONV1D[1], CONV1D[0])
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():  # different spectra: planted spikes of different strengths and heavy rows
            for j, lin in enumerate(self.layers):
                w = torch.randn(lin.weight.shape, generator=g, dtype=torch.float64) / 4
                for s in range(j % 3 + 1):
                    u, v = torch.randn(w.shape[0], 1, generator=g), torch.randn(1, w.shape[1], generator=g)
                    w += (0.6 + 0.5 * j) * (u @ v).double() / (w.shape[0] * w.shape[1]) ** 0.5 * (s + 1)
                w *= torch.rand(w.shape[0], 1, generator=g, dtype=torch.float64) ** j
                lin.weight.copy_(w)
            self.proj.weight.copy_(torch.randn(CONV1D, generator=g, dtype=torch.float64) ** 3 / 10)


KW = dict(min_eigenvalues=8, maximum_rank=12, minimum_rank=2, layer_selection_percentile=0.5)


def _table(net):
    rows = []
    cfg = S.adaptive_lora_config(net, table=rows, **KW)
    return ([r.as_dict() for r in rows], dict(cfg.rank_pattern), dict(cfg.alpha_pattern), cfg.target_modules,
            cfg.fan_in_fan_out)


class _Count:
    """Sizes of the tensors handed to ``dist.all_reduce`` / ``dist.all_gather`` (the library's collectives)."""

    def __init__(self):
        import torch.distributed as dist

        self.dist, self.log = dist, []
        self.orig = dist.all_reduce, dist.all_gather, dist.all_gather_into_tensor

    def __enter__(self):
        def reduce(t, *a, **k):
            self.log.append(("all_reduce", t.numel()))
            return self.orig[0](t, *a, **k)

        def gather(out, t, *a, **k):
            self.log.append(("all_gather", t.numel()))
            return self.orig[1](out, t, *a, **k)

        def gather_t(out, t, *a, **k):
            self.log.append(("all_gather", t.numel()))
            return self.orig[2](out, t, *a, **k)

        self.dist.all_reduce, self.dist.all_gather, self.dist.all_gather_into_tensor = reduce, gather, gather_t
        return self

    def __exit__(self, *exc):
        self.dist.all_reduce, self.dist.all_gather, self.dist.all_gather_into_tensor = self.orig


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = {}
        net = _Net().double()
        out["single"] = _table(net)
        fulls = [lin.weight.detach().clone() for lin in net.layers]
        for lin in [*net.layers, net.proj]:
            fully_shard(lin)
        fully_shard(net)
        assert all(sharded.is_sharded(lin.weight) for lin in [*net.layers, net.proj])
        with _Count() as c:
            out["sharded"] = _table(net)
        out["table_log"] = c.log
        with _Count() as c:
            sr, sigma = sharded.stable_ranks([lin.weight for lin in net.layers])
        out["stable"] = (sr, sigma, c.log)
        out["full"] = fulls
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    exit_worker()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spectral_fsdp")
    run_processes(_worker, 2, (2, str(tmp / "init"), str(tmp)), timeout=60)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_sharded_table_equals_single_process(runs):
    for out in runs:
        (rows, rp, ap, target, fifo), (ref_rows, ref_rp, ref_ap, ref_target, ref_fifo) = out["sharded"], out["single"]
        assert rp == ref_rp and target == ref_target and fifo == ref_fifo
        assert ap == pytest.approx(ref_ap)
        assert len(rows) == len(LAYERS) + 1 and sum(r["selected"] for r in rows) == (len(LAYERS) + 2) // 2
        assert rows[-1]["name"] == "proj" and rows[-1]["shape"] == (16, 40)
        for a, b in zip(rows, ref_rows, strict=True):
            assert (a["name"], a["shape"], a["num_eigs"], a["spikes"], a["rank"], a["selected"]) == \
                (b["name"], b["shape"], b["num_eigs"], b["spikes"], b["rank"], b["selected"])
            for key in ("alpha", "ks_distance", "mp_edge", "spectral_norm", "score"):
                assert a[key] == pytest.approx(b[key], rel=1e-8, abs=1e-12), (a["name"], key)
    # the rows are not all alike (the test could not pass with a constant table)
    assert len({round(r["alpha"], 6) for r in runs[0]["single"][0]}) == len(LAYERS) + 1


def test_sharded_table_moves_grams_only(runs):
    grams = sum(i * i for i, _ in LAYERS) + CONV1D[1] ** 2
    weights = sum(i * o for i, o in LAYERS) + CONV1D[0] * CONV1D[1]
    for out in runs:
        log = out["table_log"]
        assert [kind for kind, _ in log] == ["all_reduce"], log  # one flat fp64 buffer: every Gram at once
        assert log[0][1] == grams < weights


def test_sharded_stable_rank_and_spectral_norm(runs):
    full = runs[0]["full"]
    s = [torch.linalg.svdvals(w) for w in full]
    ref_sigma = torch.stack([x[0] for x in s])
    ref_sr = torch.stack([(x * x).sum() / (x[0] * x[0]) for x in s])
    for out in runs:
        sr, sigma, log = out["stable"]
        torch.testing.assert_close(sigma, ref_sigma, rtol=1e-8, atol=0)
        torch.testing.assert_close(sr, ref_sr, rtol=1e-7, atol=0)
        # only vectors move: the Frobenius norms (one number per layer) and the power iterates (n per layer)
        assert all(kind == "all_reduce" for kind, _ in log)
        assert max(n for _, n in log) == sum(i for i, _ in LAYERS)
    torch.testing.assert_close(runs[0]["stable"][0], runs[1]["stable"][0], rtol=0, atol=0)
    # the single-process op agrees (fp32 power iteration, run to convergence: layer 5's two largest singular
    # values are 1.80 and 1.70, which the default 30 iterations do not separate)
    got = ops.stable_rank([w.float() for w in full], iters=300, tol=0.0).double()
    torch.testing.assert_close(got, ref_sr, rtol=1e-4, atol=0)
