"""The ``fastlt`` console script (setup.py: ``fastlt=fastlt.cli:main``).

    fastlt train --config configs/X.yaml [--set key=value ...] [--resume auto|PATH]
    fastlt eval  --config configs/X.yaml --checkpoint runs/X/best.pt [--split val|test]
    fastlt demo  [--set key=value ...]

``train`` is the same entry point as ``python -m fastlt.train`` (which clusters launch with
``deepspeed --module fastlt.train``); ``demo`` trains ConCutMix on the cached synthetic
long-tailed dataset of ``configs/demo.yaml`` and prints overall/many/medium/few accuracy.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Sequence

# Before anything loads torch (see fastlt.train): idle OpenMP threads sleep instead of spinning.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__all__ = ["main"]

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"


def _eval(args) -> int:
    from fastlt.config import load_config
    from fastlt.evaluate import run_eval, write_metrics
    from fastlt.logger import format_metrics
    from fastlt.train import flatten_overrides, run_cli

    def go():
        cfg = load_config(args.config, flatten_overrides(args.overrides))
        m = run_eval(cfg, args.checkpoint, args.split)
        print(f"{args.split} ({m['n']} images): {format_metrics(m)}")
        if args.out:
            write_metrics({k: v for k, v in m.items()}, args.out)
            print(f"metrics written to {args.out}")

    return run_cli(go)


def _demo(args) -> int:
    from fastlt.config import load_config
    from fastlt.logger import format_metrics
    from fastlt.train import flatten_overrides, run_cli, train

    def go():
        overrides = flatten_overrides(args.overrides)
        cfg = load_config(args.config, overrides)
        if not any(o.startswith("run.name=") for o in overrides):
            cfg.run.name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
        t0 = time.perf_counter()
        result = train(cfg)
        wall = time.perf_counter() - t0
        metrics = json.loads((Path(result["run_dir"]) / "metrics.json").read_text())
        counts = metrics["train_class_counts"]
        groups = {"many": sum(c > 100 for c in counts), "medium": sum(20 <= c <= 100 for c in counts),
                  "few": sum(c < 20 for c in counts)}
        chance = 100.0 / len(counts)
        lines = [
            "",
            "=" * 72,
            f"fastlt demo: ConCutMix on the synthetic long-tailed set ({len(counts)} classes: "
            f"{groups['many']} many-shot, {groups['medium']} medium-shot, {groups['few']} few-shot)",
            f"  accuracy (%)      {format_metrics(result)}",
            f"  chance level      {chance:.2f}",
            f"  few-shot vs chance {'ABOVE' if result['few'] > chance else 'NOT above'} "
            f"({result['few']:.2f} vs {chance:.2f})" if not math.isnan(result["few"]) else "  few-shot: no few-shot class",
            f"  training time     {result['train_time_s']:.1f} s   (wall time {wall:.1f} s, data generation included)",
            f"  run directory     {result['run_dir']}",
            "=" * 72,
        ]
        print("\n".join(lines), flush=True)

    return run_cli(go)


def build_parser() -> argparse.ArgumentParser:
    from fastlt.train import add_common_args

    p = argparse.ArgumentParser(prog="fastlt", description="ConCutMix + BCL long-tailed training (DeepSpeed).")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train from a YAML recipe (same as python -m fastlt.train)")
    add_common_args(t)
    t.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="auto: continue the run directory's latest checkpoint; PATH: a checkpoint directory")

    e = sub.add_parser("eval", help="evaluate a checkpoint on the val or test list")
    add_common_args(e)
    e.add_argument("--checkpoint", required=True,
                   help="best.pt / last.pt of a run, a checkpoint directory, or a run directory (its latest)")
    e.add_argument("--split", default="val", choices=("val", "test"))
    e.add_argument("--out", default=None, help="also write the metrics (with per-class accuracy) to this JSON file")

    d = sub.add_parser("demo", help="train ConCutMix on the cached synthetic long-tailed dataset and report accuracy")
    d.add_argument("--config", default=str(DEMO_CONFIG), help=f"default: {DEMO_CONFIG}")
    d.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set method.l_d_warm=30")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        from fastlt.train import main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "eval":
        return _eval(args)
    if args.command == "demo":
        return _demo(args)
    raise AssertionError(f"unhandled command {args.command}")  # argparse rejects unknown commands first


if __name__ == "__main__":
    sys.exit(main())
