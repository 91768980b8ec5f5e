"""Adapter fine-tuning on the demo: pretrain TinyViT on digits 0-4, adapt to digits 5-9.

Every method starts from the same pretrained base with a fresh 5-class head and trains for the same
number of steps with AdamW; the table reports held-out accuracy on 5-9 (mean ± std over seeds) and the
trainable parameters (head included: 325 of them).

    python -m bench.adapters_finetune            # 3 seeds x 200 steps; files bench/results/adapters-<device>.json
    python -m bench.adapters_finetune --quick    # 1 seed, 150 steps
    python -m bench.adapters_finetune --methods head lora_all tenslora:qkv:tucker:8_8_3 --seeds 2

Methods: ``head`` (linear probe), ``lora_qkv`` / ``lora_all`` (our ``nn.LoRALinear`` on the qkv / on
every block Linear), ``spectral_lora`` (PEFT LoRA with ranks from ``adapters.spectral``) and TensLoRA
variants (``adapters.tenslora``; ``+`` = TensLoRA+ learning rates, core x4).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from bench.tables import write_table
from lowrank_kernels.adapters import spectral, tenslora, tenslora_plus
from lowrank_kernels.app.models import count_parameters, load_digits, vit_tiny
from lowrank_kernels.nn import LoRALinear

LR = 3e-3
BATCH = 64


def _data(device):
    xtr, ytr, xte, yte = load_digits()
    lo_tr, lo_te, hi_tr, hi_te = ytr < 5, yte < 5, ytr >= 5, yte >= 5
    pre = (xtr[lo_tr].to(device), ytr[lo_tr].to(device), xte[lo_te].to(device), yte[lo_te].to(device))
    new = (xtr[hi_tr].to(device), (ytr[hi_tr] - 5).to(device), xte[hi_te].to(device), (yte[hi_te] - 5).to(device))
    return pre, new


def _train(model: nn.Module, groups, x, y, steps: int, seed: int) -> None:
    opt = torch.optim.AdamW(groups, lr=LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (BATCH,), generator=gen).to(x.device)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


@torch.no_grad()
def _accuracy(model: nn.Module, x, y) -> float:
    model.eval()
    return float((model(x).argmax(-1) == y).float().mean()) * 100


def pretrain(device, steps: int = 400, seed: int = 0):
    """The base model: TinyViT (dim 64, depth 2, 4 heads) trained on digits 0-4; returns (model, acc)."""
    (x, y, xt, yt), _ = _data(device)
    torch.manual_seed(seed)
    model = vit_tiny(num_classes=5).to(device)
    _train(model, model.parameters(), x, y, steps, seed)
    return model, _accuracy(model, xt, yt)


def _new_head(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(False)
    model.head = nn.Linear(model.head.in_features, 5).to(model.head.weight.device)
    return model


def _lora(model, names, r=8):
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(model.get_submodule(name), r=r, alpha=2 * r))
    return model, [p for p in model.parameters() if p.requires_grad]


def _build(method: str, base: nn.Module):
    """(model, optimizer param groups) for ``method``; only the adapter and the new head train."""
    m = _new_head(base)
    linears = [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear) and n.startswith("blocks.")]
    if method == "head":
        return m, list(m.head.parameters())
    if method == "lora_qkv":
        return _lora(m, [n for n in linears if n.endswith("attn.qkv")])
    if method == "lora_all":
        return _lora(m, linears)
    if method == "spectral_lora":
        from peft import get_peft_model

        cfg = spectral.adaptive_lora_config(m, target_modules=r"blocks\..*", layer_selection_percentile=0.5,
                                            minimum_rank=4, maximum_rank=16, alpha_scaling_factor=2.0)
        pm = get_peft_model(m, cfg)
        pm.base_model.model.head.requires_grad_(True)
        return pm, [p for p in pm.parameters() if p.requires_grad]
    if method.startswith("tenslora"):
        _, tmethod, dec, ranks = method.rstrip("+").split(":")
        tenslora.apply_tenslora(m, method=tmethod, ranks=ranks, decomposition=dec, freeze_base=False)
        m.head.requires_grad_(True)
        core_mult = 4.0 if method.endswith("+") else 1.0
        return m, tenslora_plus.param_groups(m, LR, core_mult=core_mult)
    raise ValueError(f"unknown method {method!r}")


# the default set (``lora_all`` and any ``tenslora:<method>:<tucker|cp>:<ranks>[+]`` on request: --methods)
METHODS = ("head", "lora_qkv", "spectral_lora", "tenslora:att_qkv_depth:tucker:8_8_4_3_2",
           "tenslora:att_qkv_depth:tucker:8_8_4_3_2+", "tenslora:att:tucker:8_8_4", "tenslora:qkv_depth:cp:16")


def _label(method: str) -> str:
    if not method.startswith("tenslora"):
        return method
    _, tm, dec, ranks = method.rstrip("+").split(":")
    return f"tenslora{'+' if method.endswith('+') else ''} {tm} {dec} {ranks}"


def run(quick: bool = True, device: str | None = None, methods=METHODS, seeds=None, steps=None,
        pretrain_steps=None) -> list[dict]:
    """One row per method: accuracy (mean, std over seeds) on held-out 5-9 and trainable parameters."""
    device = torch.device(device or "cpu")
    if device.type == "cpu":
        # tiny shapes: on a shared 2-core box intra-op threads spin and make each op ~100x slower
        torch.set_num_threads(1)
    seeds = seeds if seeds is not None else ((0,) if quick else (0, 1, 2))
    steps = steps if steps is not None else (150 if quick else 200)
    t0 = time.perf_counter()
    base, base_acc = pretrain(device, steps=pretrain_steps or (250 if quick else 300))
    _, (x, y, xt, yt) = _data(device)
    rows = []
    for method in methods:
        accs, params, secs = [], 0, 0.0
        for seed in seeds:
            torch.manual_seed(seed)
            model, groups = _build(method, base)
            params = count_parameters(model)
            t = time.perf_counter()
            _train(model, groups, x, y, steps, seed)
            secs += time.perf_counter() - t
            accs.append(_accuracy(model, xt, yt))
        rows.append(dict(method=_label(method), trainable_params=params, accuracy=statistics.mean(accs),
                         accuracy_std=statistics.pstdev(accs), seeds=len(seeds), steps=steps,
                         train_s=secs / len(seeds), base_acc_0_4=base_acc))
    rows[0]["total_s"] = time.perf_counter() - t0
    return rows


def format_markdown(rows: list[dict]) -> str:
    out = ["| method | trainable params | held-out acc. on 5-9 (%) | train s/seed |", "|---|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['method']} | {r['trainable_params']:,} | {r['accuracy']:.1f} ± {r['accuracy_std']:.1f} "
                   f"| {r['train_s']:.1f} |")
    return "\n".join(out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default=None)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), help="e.g. head lora_all tenslora:qkv:tucker:8_8_3")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, --quick 1)")
    ap.add_argument("--steps", type=int, default=None, help="adaptation steps per method (default 200, --quick 150)")
    args = ap.parse_args()
    res = run(quick=args.quick, device=args.device, methods=args.methods, steps=args.steps,
              seeds=tuple(range(args.seeds)) if args.seeds else None)
    print(f"base model accuracy on held-out 0-4: {res[0]['base_acc_0_4']:.1f}%  ({res[0]['seeds']} seed(s), "
          f"{res[0]['steps']} steps per method, total {res[0]['total_s']:.0f} s)")
    print(format_markdown(res))
    if not args.quick:
        cells = [[r["method"], r["trainable_params"], f"{r['accuracy']:.1f} ± {r['accuracy_std']:.1f}"] for r in res]
        command = "python -m bench.adapters_finetune" + (f" --seeds {args.seeds}" if args.seeds else "")
        path = write_table("adapters", "Adapters: TinyViT pretrained on digits 0-4, adapted to 5-9", [
            "method", "trainable params", "held-out acc on 5-9 (%)"], cells, command,
            notes=f"Base model {res[0]['base_acc_0_4']:.1f}% on held-out 0-4; a fresh 5-class head; "
                  f"{res[0]['steps']} AdamW steps per method; mean ± std over {res[0]['seeds']} seeds.",
            device=args.device)
        print(f"wrote {path}")
