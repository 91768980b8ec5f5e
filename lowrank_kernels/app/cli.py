"""``lowrank-kernels`` / ``python -m lowrank_kernels.app``: demo, train, sweep, bench, techniques.

Bad input (a missing file, a rank larger than a layer, an unknown technique, a non-numeric flag) gives one
line on stderr and exit status 2, never a traceback (set ``LOWRANK_KERNELS_DEBUG=1`` to see one).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

PROG = "lowrank-kernels"


class UsageError(Exception):
    """A bad command line or input: one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the whole usage block first
        raise UsageError(f"{self.prog}: {message}")


def _rank_arg(s: str):
    from .config import parse_rank

    try:
        return parse_rank(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid rank value: {s!r} (an int or a fraction in (0, 1))") from None


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    from .config import TrainConfig, field_type
    from .techniques import TECHNIQUE_DEFAULTS

    p.add_argument("--config", help="YAML or JSON file of config keys (flags override it)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        typ = field_type(f.name)
        own = "".join(f"; {t}: {d[f.name]}" for t, d in TECHNIQUE_DEFAULTS.items() if f.name in d)
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=f"{f.metadata['help']} (default: {f.default}{own})")
        if typ is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        if f.name == "target_rank":
            kw["type"] = _rank_arg
        elif typ in (int, float):
            kw["type"] = typ
        if f.metadata.get("choices"):
            kw["metavar"] = "{" + ",".join(f.metadata["choices"]) + "}"
        p.add_argument(flag, **kw)


def _train_config(args: argparse.Namespace):
    from .config import TrainConfig, from_dict, load_file

    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    base = {}
    if args.config:
        base = load_file(args.config)
    elif flags.get("resume"):  # resuming: the run's own config, then the flags
        saved = Path(flags.get("out", TrainConfig.out)) / "config.json"
        if saved.is_file():
            base = load_file(str(saved))
            base.pop("stop_after", None)  # the interruption is not part of the run's config
    return from_dict({**base, **flags})


def cmd_train(args: argparse.Namespace) -> int:
    from .train import run

    cfg = _train_config(args)
    res = run(cfg)
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 alone reports (every process got the same res)
        return 0
    if "stopped_at" in res:
        print(f"stopped after step {res['stopped_at']}; checkpoint in {cfg.out}/checkpoint.pt (continue with --resume)")
        return 0
    extra = f", ppl {res['test_ppl']:.2f}" if "test_ppl" in res else ""
    ranks = " ".join(f"{k.split('.', 1)[-1]}:{v['rank']}" for k, v in res["layers"].items())
    base = res.get("adapter_base")
    if base:
        print(f"adapter base: {base['pretrained_on']} (test acc {base['pretrain_acc']:.4f}; "
              f"{'cached' if base['cached'] else 'trained now, cached'} in {base['path']}); adapted to "
              f"{base['adapted_to']}")
    print(f"{cfg.technique}: test acc {res['test_acc']:.4f}, loss {res['test_loss']:.4f}{extra}, "
          f"params {res['params']:,} (trainable {res['params_trainable']:,} = "
          f"{100 * res['params_trainable_frac']:.2f}%), acc truncated to target rank {res['truncated_acc']:.4f}, "
          f"{res['train_time_s']:.1f}s")
    print(f"rank@1% per layer: {ranks}")
    if "controller_ranks" in res:
        print("controller's factor ranks: " + " ".join(f"{k.split('.', 1)[-1]}:{v}"
                                                       for k, v in res["controller_ranks"].items()))
    out = Path(cfg.out)
    files = [str(out / f) for f in ("config.json", "log.jsonl", "checkpoint.pt", "final.json", "final_model.pt")
             if (out / f).is_file()]
    print("wrote " + ", ".join(files + list(res.get("plots", []))))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import default_results_path, run_demo

    results = default_results_path() if args.results == "auto" else args.results or None
    run_demo(out=args.out, epochs=args.epochs, seed=args.seed, threads=args.threads, progress=args.progress,
             quick=args.quick, lmbda=args.lmbda, plots=args.plots, results_path=results)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import run_sweep

    return run_sweep(args.grid, workers=args.workers, out=args.out)


def cmd_bench(args: argparse.Namespace) -> int:
    return _bench(args.bench_args)


def _bench(bench_args: list[str]) -> int:
    root = Path.cwd()
    if not (root / "bench" / "__main__.py").is_file():
        raise UsageError("bench: run it from the lowrank-kernels repository root (no bench/__main__.py in "
                         f"{root}); the benchmark suite is not part of the installed package")
    return subprocess.call([sys.executable, "-m", "bench", *bench_args], cwd=root)


def cmd_techniques(args: argparse.Namespace) -> int:
    from .techniques import DESCRIPTIONS, TECHNIQUE_DEFAULTS, availability

    for name, why in availability().items():
        own = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in TECHNIQUE_DEFAULTS.get(name, {}).items())
        line = f"{name:14s} {DESCRIPTIONS[name]}" + (f" [defaults: {own}]" if own else "")
        print(line if why is None else f"{line} -- UNAVAILABLE: {why}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Low-rank training kernels: demo, training runs, sweeps, benchmarks.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("demo", help="train a tiny ViT on sklearn digits: dense AdamW vs AdamQ3R vs LowRank+controller")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per technique (default: 20, --quick: 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: this tiny model gains little from more, and loses a lot "
                        "on a busy machine)")
    p.add_argument("--lmbda", type=float, default=None, help="Q3R strength for the AdamQ3R run")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run (smoke test)")
    p.add_argument("--results", default="", metavar="PATH",
                   help="also write the results table as JSON to PATH; 'auto': bench/results/demo-<machine>.json, "
                        "the committed file the README's demo table comes from (run from the repository root)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train one configuration (flags and/or --config FILE)")
    _add_train_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", help="run a grid of train configurations (grid.yaml) as a queue over devices")
    p.add_argument("grid", help="YAML/JSON grid file (see examples/grid.yaml)")
    p.add_argument("--workers", type=int, default=None, help="CPU worker processes (default: from the grid, else 1);"
                   " with GPUs one job runs per GPU")
    p.add_argument("--out", default=None, help="sweep folder (default: from the grid, else runs/sweep)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("bench", help="run the benchmark suite (python -m bench; from the repository root)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for python -m bench (e.g. --quick)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("techniques", help="list the training techniques: what each does, its own defaults, and "
                                          "whether this build has it")
    p.set_defaults(func=cmd_techniques)
    return parser


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 failure during a run, 2 bad input)."""
    from .errors import ConfigError

    debug = os.environ.get("LOWRANK_KERNELS_DEBUG", "") not in ("", "0")
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["bench"]:
            return _bench(argv[1:])  # everything after `bench` belongs to python -m bench, options included
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except (UsageError, ConfigError) as exc:
        if debug:
            raise
        msg = _one_line(exc)
        print(msg if msg.startswith(PROG) else f"{PROG}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a run that fails prints one line unless debugging
        if debug:
            raise
        print(f"{PROG}: error: {type(exc).__name__}: {_one_line(exc)} (LOWRANK_KERNELS_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
