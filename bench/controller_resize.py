"""The loss spike after a rank change, with the optimizer state carried through the resize vs reset.

TinyViT (dim 64, depth 2) on digits, qkv/proj/fc1/fc2 as ``LowRankLinear`` rank 16, AdamW lr 3e-3, batch 64:
40 steps, then every layer resized (grow 16 -> 24 or shrink 16 -> 8) by ``RankController.apply`` with
``state_policy="carry"`` or ``"reset"``; spike = the worst loss (first 512 training images) over the next 3
steps minus the loss right after the resize (lower is better).

    python -m bench.controller_resize            # seeds 0-2, files bench/results/controller-resize-<device>.json
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

from bench.tables import write_table
from lowrank_kernels.app.models import load_digits, vit_tiny
from lowrank_kernels.nn import replace_linear
from lowrank_kernels.rank import RankController

RESIZES = (("grow", 24), ("shrink", 8))


def spikes(seed: int = 0) -> dict[tuple[str, str], float]:
    """``{(mode, policy): spike}`` for mode in grow/shrink and policy in carry/reset (deterministic per seed)."""
    torch.manual_seed(seed)
    xtr, ytr, _, _ = load_digits()
    model = replace_linear(vit_tiny(), 16, target_modules=["qkv", "proj", "fc1", "fc2"])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, len(ytr), (64,), generator=gen) for _ in range(43)]

    def train(m, o, idx):
        loss = F.cross_entropy(m(xtr[idx]), ytr[idx])
        o.zero_grad()
        loss.backward()
        o.step()

    def eval_loss(m):
        with torch.no_grad():
            return F.cross_entropy(m(xtr[:512]), ytr[:512]).item()

    for idx in batches[:40]:
        train(model, opt, idx)
    out = {}
    for mode, rank in RESIZES:
        for policy in ("carry", "reset"):
            m, o = copy.deepcopy((model, opt))
            ctrl = RankController(m, o, state_policy=policy)
            ctrl.apply({name: rank for name in ctrl.layers})
            start = eval_loss(m)
            after = []
            for idx in batches[40:]:
                train(m, o, idx)
                after.append(eval_loss(m))
            out[mode, policy] = max(after) - start
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for seed in range(args.seeds):
        s = spikes(seed)
        for mode, rank in RESIZES:
            rows.append([f"{mode} 16 → {rank}", seed, round(s[mode, "carry"], 3), round(s[mode, "reset"], 3)])
    path = write_table("controller-resize", "Rank controller: loss spike after a resize (lower is better)",
                       ["resize", "seed", "optimizer state carried", "state reset"], rows,
                       f"python -m bench.controller_resize --seeds {args.seeds}",
                       notes="TinyViT on digits, LowRankLinear rank 16, AdamW lr 3e-3; spike = worst loss over the "
                             "3 steps after the resize minus the loss right after it.")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
