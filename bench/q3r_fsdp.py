"""Bytes moved by AdamQ3R's collectives under FSDP2 (``fully_shard``, 2 gloo processes, CPU), sharded vs gathering.

A transformer block's regularised weights (``qkv`` fused 3 x (d, d), ``proj`` (d, d), ``fc1`` (4d, d), ``fc2``
(d, 4d); d = 384, fp32, target rank 0.25 and 0.05, ``steps=3``) trained on random data, with each rebuild
choice. Every ``dist.all_reduce``
and ``dist.all_gather`` that Q3R issues is counted (payload bytes: the tensor reduced, or the gathered
result) at the first step (the exact first rebuild), a plain step and a warm rebuild. FSDP2's own
all-gathers / reduce-scatters (the same with any optimizer) are not counted.

The alternative is to gather each regularised weight, work on it whole, and drop it again: one all-gather
of every weight per step (the step's ``P = U^T X`` needs all rows) and per rebuild. Wire bytes per process
for a ring over ``p`` processes: an all-reduce of ``B`` bytes sends ``2 (p - 1) / p B``, an all-gather of a
``B``-byte result ``(p - 1) / p B``; both columns use these.

    python -m bench.q3r_fsdp            # files bench/results/q3r-fsdp-<device>.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import torch.multiprocessing as mp
from torch import nn

WORLD = 2
D = 384


class Block(nn.Module):
    def __init__(self, d: int = D):
        super().__init__()
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        x = x + self.proj(torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v)
        return x + self.fc2(torch.relu(self.fc1(x)))


def _targets(net: Block) -> dict:
    d = net.proj.weight.shape[0]
    return {net.qkv: [(0, d), (d, 2 * d), (2 * d, 3 * d)], net.proj: None, net.fc1: None, net.fc2: None}


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from lowrank_kernels import AdamQ3R

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from lowrank_kernels.q3r import sharded

    x = torch.randn(4, 32, D, generator=torch.Generator().manual_seed(1))
    log: list[tuple[str, int]] = []  # (collective, payload bytes)
    orig = dist.all_reduce, dist.all_gather

    def reduce(t, *a, **k):
        log.append(("all_reduce", t.numel() * t.element_size()))
        return orig[0](t, *a, **k)

    def gather(out, t, *a, **k):  # payload: the gathered result
        log.append(("all_gather", t.numel() * t.element_size() * len(out)))
        return orig[1](out, t, *a, **k)

    result = {}
    for mode, frac in (("sharded", 0.25), ("auto", 0.25), ("sharded", 0.05), ("auto", 0.05)):
        sharded.REBUILD = mode
        torch.manual_seed(0)
        net = Block()
        for m in (net.qkv, net.proj, net.fc1, net.fc2):
            fully_shard(m)
        fully_shard(net)
        opt = AdamQ3R(net.parameters(), _targets(net), target_rank=frac, lmbda=0.1, steps=3, lr=1e-3)
        phases = {}
        for name in ("first rebuild (exact)", "step", None, "warm rebuild"):
            log.clear()
            dist.all_reduce, dist.all_gather = reduce, gather
            try:
                opt.zero_grad()
                net(x).square().mean().backward()
                opt.step()
            finally:
                dist.all_reduce, dist.all_gather = orig
            if name:
                phases[name] = list(log)
        result[(mode, frac)] = {"phases": phases, "kept": opt.q3r.effective_ranks(),
                        "last_rebuild": dict(opt.q3r.sharded_rebuild)}
    if rank == 0:
        torch.save(result, out)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo may abort in static destructors at exit (see python_tests/test_q3r_ddp.py)


def measure() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.pt")
        mp.spawn(_worker, args=(WORLD, os.path.join(tmp, "init"), out), nprocs=WORLD, join=True)
        return torch.load(out, weights_only=False)


def rows(result: dict) -> list[list]:
    net = Block()
    weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in _targets(net))
    p = WORLD
    gather_wire = (p - 1) / p * weight_bytes
    out = []
    for (mode, frac), res in result.items():
        for phase, log in res["phases"].items():
            payload = sum(b for _, b in log)
            wire = sum((2 if kind == "all_reduce" else 1) * (p - 1) / p * b for kind, b in log)
            out.append([frac, mode, phase, len(log), payload, round(wire), round(gather_wire),
                        round(gather_wire / wire, 2)])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = parser.parse_args()
    from bench.tables import write_table

    result = measure()
    table = rows(result)
    columns = ["target rank", "rebuild choice", "phase", "collectives", "payload bytes",
               "wire bytes / process (sharded)",
               "wire bytes / process (gather weights)", "gather / sharded"]
    counts = "; ".join(f"{mode} {frac}: {res['last_rebuild']}" for (mode, frac), res in result.items())
    notes = (f"{WORLD} processes (gloo, CPU), d = {D}, fp32, target rank a fraction of min(m, n), steps = 3. Rebuild "
             "choice (lowrank_kernels.q3r.sharded.REBUILD): 'sharded' = the maths on the shards for every operator, "
             "'auto' (default) = per operator whichever moves fewer bytes by its estimate (gathering the operator's "
             "rows and running the single-process rebuild, or the maths on the shards). The warm rebuild's "
             f"operators ({counts}; checked: Ritz residuals checked; refined: failed the check, iterated; gathered: "
             "rebuilt from gathered rows). Each rebuild row includes that step's own P all-reduce. A step moves the "
             "thin products P = U^T X of every operator in one flat all-reduce (plus a non-finite flag when the "
             "optimizer checks on the host); an exact rebuild all-gathers each (m <= n) operator's rows or "
             "all-reduces its (n, n) fp64 Gram; a warm sharded rebuild moves two (l, l) fp64 Grams and one (l, n) "
             "projection per operator and pass.")
    kw = {} if args.out is None else {"out": args.out}
    path = write_table("q3r-fsdp", "AdamQ3R under FSDP2: bytes of its collectives, sharded vs gathering the weights",
                       columns, table, "python -m bench.q3r_fsdp", notes=notes, device=torch.device("cpu"), **kw)
    for row in table:
        print(row)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
