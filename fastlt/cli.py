"""The command line: every ``fastlt`` command and ``python -m fastlt.train`` (setup.py:
``fastlt=fastlt.cli:main``). All argument parsing lives here.

    fastlt train --config configs/X.yaml [--set key=value ...] [--resume auto|PATH]
    fastlt eval  --config configs/X.yaml --checkpoint runs/X/best.pt [--split val|test] [--out F] [--report-dir D]
    fastlt demo  [--config C] [--set key=value ...]
    fastlt data  PATH-or-config [--root R] [--out D] [--no-check] [--decode]   # a dataset's histogram and bad files
    fastlt inspect --config C --checkpoint P [--out D] [--samples N]      # the ConCutMix label on real batches
    fastlt recipes                                                        # the shipped recipes, published top-1
    fastlt profile --config C [--steps N] [--warmup W] [--phase area|rectified] [--out D]  # torch.profiler
    python -m fastlt.train --config ...            # = fastlt train; what `deepspeed --module` launches

``--config`` takes a YAML path or the name of a shipped recipe (``fastlt recipes``); a path wins.

Expected failures (``fastlt.errors``) end in one ``fastlt: error: ...`` line on rank 0 and an
exit code (2 config/data/checkpoint/output, 3 non-finite loss, 130 Ctrl-C, 143 SIGTERM).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

# Before anything loads torch: idle OpenMP threads sleep instead of spinning. On a CPU shared with
# data workers, other ranks or other jobs, spinning threads steal the cores the busy ones need
# (measured here: a ResNet-32 step 4-5× slower in wall time under load). Set it to ACTIVE to opt out.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__all__ = ["build_parser", "main", "run_cli", "train_main"]


def _add_config_args(p: argparse.ArgumentParser, *, default_config: str | None = None) -> None:
    if default_config is None:
        p.add_argument("--config", required=True,
                       help="YAML recipe path, or a shipped recipe's name (fastlt recipes), e.g. cifar100_lt_if100")
    else:
        p.add_argument("--config", default=default_config, help=f"YAML recipe (default: {default_config})")
    p.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=0.05 method.l_d_warm=10 (repeatable)")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="auto: continue from the run directory's latest checkpoint; PATH: a checkpoint directory")


def build_parser() -> argparse.ArgumentParser:
    """The ``fastlt`` parser with its sub-commands."""
    from fastlt.demo import DEMO_CONFIG

    p = argparse.ArgumentParser(prog="fastlt", description="ConCutMix + BCL long-tailed training (DeepSpeed).")
    sub = p.add_subparsers(dest="command", required=True)
    _add_train_args(sub.add_parser("train", help="train from a YAML recipe (same as python -m fastlt.train)"))
    e = sub.add_parser("eval", help="evaluate a checkpoint on the val or test list")
    _add_config_args(e)
    e.add_argument("--checkpoint", required=True,
                   help="best.pt / last.pt of a run, a checkpoint directory, or a run directory (its latest)")
    e.add_argument("--split", default="val", choices=("val", "test"))
    e.add_argument("--out", default=None, help="also write the metrics (with per-class accuracy) to this JSON file")
    e.add_argument("--report-dir", default=None,
                   help="where the plots and per_class.csv go (default: eval_<split>/ in the checkpoint's "
                        "run directory)")
    d = sub.add_parser("demo", help="train ConCutMix on the cached synthetic long-tailed dataset and report accuracy")
    _add_config_args(d, default_config=str(DEMO_CONFIG))
    a = sub.add_parser("data", help="class histogram (text + PNG), shot groups and unreadable files of a dataset",
                       description="Exit code 1 when unreadable files were found.")
    a.add_argument("target", help="an image folder (root/train/<class>/... or root/<class>/...), a list file, "
                                  "or a config path / recipe name")
    a.add_argument("--root", default=None,
                   help="list files: the folder the paths are relative to (default: the list's)")
    a.add_argument("--num-classes", type=int, default=None, help="list files: C (default: max label + 1)")
    a.add_argument("--class-names", default=None, help="list files: a file with one class name per line")
    a.add_argument("--out", default=None, help="report folder (default: runs/data-<name>)")
    a.add_argument("--no-check", dest="check", action="store_false", help="skip the header check of every image")
    a.add_argument("--decode", action="store_true", help="decode every image fully, not just its header (slower)")
    a.add_argument("--workers", type=int, default=8, help="threads reading the images (default 8)")
    a.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                   help="configs: override a value, as for train")
    i = sub.add_parser("inspect", help="render the ConCutMix label of mixed samples from the training pipeline "
                                       "(PNG grid + HTML page)")
    _add_config_args(i)
    i.add_argument("--checkpoint", required=True, help="best.pt / last.pt, a checkpoint directory or a run directory")
    i.add_argument("--out", default=None, help="output folder (default: inspect/ in the checkpoint's run directory)")
    i.add_argument("--samples", type=int, default=16, help="mixed samples to show (default 16)")
    i.add_argument("--epoch", type=int, default=None, help="epoch of the sample sequence (default: the checkpoint's)")
    i.add_argument("--topk", type=int, default=3, help="classes of the rectified label to list per sample (default 3)")
    sub.add_parser("recipes", help="list the shipped recipes with their published top-1")
    r = sub.add_parser("profile", help="record training steps with torch.profiler: Chrome/Perfetto trace, TensorBoard "
                                       "profile, top operators/kernels, kernel launches and host syncs per step")
    _add_config_args(r)
    r.add_argument("--steps", type=int, default=5, help="training steps recorded (default 5)")
    r.add_argument("--warmup", type=int, default=3, help="steps run before recording (default 3)")
    r.add_argument("--phase", default="rectified", metavar="area|rectified",
                   help="label phase: rectified (ConCutMix labels, after method.l_d_warm; default) or area (CutMix)")
    r.add_argument("--out", default=None, help="output folder (default: <run.output_dir>/<run.name>-profile/profile)")
    r.add_argument("--top", type=int, default=15, help="rows of the self-time table (default 15)")
    return p


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastlt.train", description="Train ConCutMix + BCL (DeepSpeed).")
    _add_train_args(p)
    # The deepspeed launcher appends --local_rank=N; the rank is read from the environment instead.
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _overrides(args) -> list[str]:
    return [item for group in args.overrides for item in group]


def _load(args):
    from fastlt.config.loader import load_config
    from fastlt.config.recipes import resolve_config

    return load_config(resolve_config(args.config), _overrides(args))


def run_cli(fn: Callable[[], None]) -> int:
    """Run fn() and turn the expected failures into one clear message and an exit code."""
    from fastlt.errors import FastltError, TrainingInterrupted, exit_code
    from fastlt.training.signals import SecondInterrupt

    def is_rank0() -> bool:  # at the time of the message: a SLURM task learns its RANK during setup
        return os.environ.get("RANK", "0") == "0"

    def say(msg: str) -> None:
        if is_rank0():
            print(f"fastlt: error: {msg}", file=sys.stderr, flush=True)

    try:
        fn()
        return 0
    except TrainingInterrupted as e:
        if is_rank0():
            print(f"fastlt: {e}", file=sys.stderr, flush=True)
        return exit_code(e)
    except FastltError as e:
        report = getattr(e, "report", None)  # a lost rank is reported by the lowest surviving one
        if report if isinstance(report, bool) else is_rank0():
            print(f"fastlt: error: {e}", file=sys.stderr, flush=True)
        return exit_code(e)
    except SecondInterrupt:
        say("aborted by a second Ctrl-C; checkpoints already written are complete (resume with --resume auto)")
        return 130
    except KeyboardInterrupt:  # outside a training loop (setup, evaluation at the end): nothing was being saved
        if is_rank0():
            print("fastlt: interrupted by Ctrl-C before a training step could finish (during setup or outside the "
                  "training loop); checkpoints already written are complete: continue with --resume auto",
                  file=sys.stderr, flush=True)
        return 130


def _train(args) -> int:
    def go():
        from fastlt.training.trainer import train

        train(_load(args), resume=args.resume)

    return run_cli(go)


def _eval(args) -> int:
    def go():
        from fastlt.training.evaluate import checkpoint_run_dir, run_eval, write_metrics
        from fastlt.files import check_output_file
        from fastlt.reports.logger import format_metrics
        from fastlt.reports.plots import write_eval_report

        if args.out:  # before the evaluation, not after it
            check_output_file(args.out, "--out")
        m = run_eval(_load(args), args.checkpoint, args.split)
        print(f"{args.split} ({m['n']} images): {format_metrics(m)}")
        if args.out:
            write_metrics(m, args.out)
            print(f"metrics written to {args.out}")
        run_dir = checkpoint_run_dir(args.checkpoint)
        paths = write_eval_report(args.report_dir or run_dir / f"eval_{args.split}", m, run_dir / "log.jsonl")
        print(f"plots and per-class CSV: {', '.join(str(p) for p in paths)}")

    return run_cli(go)


def _demo(args) -> int:
    def go():
        from fastlt.demo import run_demo

        name_given = any(o.startswith("run.name=") for o in _overrides(args))
        print(run_demo(_load(args), name_given=name_given), flush=True)

    return run_cli(go)


def _data(args) -> int:
    found = []

    def go():
        from fastlt.reports.dataset_report import load_target, write_report

        t = load_target(args.target, root=args.root, num_classes=args.num_classes, class_names=args.class_names,
                        overrides=_overrides(args))
        text, files, bad = write_report(t, args.out or os.path.join("runs", f"data-{t.name}"), check=args.check,
                                        decode=args.decode, workers=args.workers)
        print(text)
        print(f"written: {', '.join(str(f) for f in files)}", flush=True)
        found.append(bad)

    rc = run_cli(go)
    return 1 if rc == 0 and found and found[0] else rc


def _inspect(args) -> int:
    def go():
        from fastlt.training.evaluate import checkpoint_run_dir
        from fastlt.reports.label_inspect import inspect_labels

        out = args.out or checkpoint_run_dir(args.checkpoint) / "inspect"
        paths, rows = inspect_labels(_load(args), args.checkpoint, out, samples=args.samples, epoch=args.epoch,
                                     show_topk=args.topk)
        print(f"{len(rows)} mixed samples: {', '.join(str(p) for p in paths)}", flush=True)

    return run_cli(go)


def _recipes(args) -> int:
    def go():
        from fastlt.config.recipes import format_recipes

        print(format_recipes(), flush=True)

    return run_cli(go)


def _profile(args) -> int:
    # Before torch loads: kineto's own error lines (e.g. "gpuGetDeviceCount failed" on a machine
    # without a GPU) stay off the console; fastlt.reports.profiling reports a CUDA run that recorded nothing.
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")

    def go():
        from fastlt.reports.profiling import format_report, profile_run

        summary = profile_run(_load(args), steps=args.steps, warmup=args.warmup, phase=args.phase, out=args.out,
                              top=args.top)
        print(format_report(summary), flush=True)

    return run_cli(go)


def train_main(argv: Sequence[str] | None = None) -> int:
    """``python -m fastlt.train`` / ``deepspeed --module fastlt.train``."""
    return _train(_train_parser().parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """The ``fastlt`` console script."""
    args = build_parser().parse_args(argv)
    return {"train": _train, "eval": _eval, "demo": _demo, "data": _data, "inspect": _inspect,
            "recipes": _recipes, "profile": _profile}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
