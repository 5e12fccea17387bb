"""The command line: every ``fastlt`` command and ``python -m fastlt.train`` (setup.py:
``fastlt=fastlt.cli:main``). All argument parsing lives here; what each command then does is in
``fastlt.commands``.

    fastlt train --config configs/X.yaml [--set key=value ...] [--epochs N] [--resume auto|PATH]
    fastlt eval  --config configs/X.yaml --checkpoint runs/X/best.pt [--split val|test] [--out F] [--report-dir D]
    fastlt demo  [--config C] [--set key=value ...]
    fastlt data  PATH-or-config [--root R] [--out D] [--no-check] [--decode]   # a dataset's histogram and bad files
    fastlt inspect --config C --checkpoint P [--out D] [--samples N]      # the ConCutMix label on real batches
    fastlt inspect --views --backend dali|torch --config C [--compare F.npz]   # a backend's training views
    fastlt recipes                                                        # the shipped recipes, published top-1
    fastlt config --config C [--set ...] [--epochs N] [--world-size W]    # resolved YAML + DeepSpeed JSON
    fastlt export --checkpoint runs/X/best.pt [--out D]                   # timm-loadable safetensors
    fastlt --version
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
from typing import Sequence

# Before anything loads torch: idle OpenMP threads sleep instead of spinning. On a CPU shared with
# data workers, other ranks or other jobs, spinning threads steal the cores the busy ones need
# (measured here: a ResNet-32 step 4-5× slower in wall time under load). Set it to ACTIVE to opt out.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from fastlt.commands import COMMANDS, run_cli, train_command  # noqa: E402 (after the OpenMP setting)

__all__ = ["build_parser", "main", "run_cli", "train_main"]


class _Parser(argparse.ArgumentParser):
    """argparse with fastlt's one-line errors: ``fastlt: error: <command>: <what>`` and exit 2
    (the usage is one ``--help`` away), for sub-commands too."""

    def error(self, message):  # noqa: D102 - argparse's hook
        self.exit(2, f"fastlt: error: {self.prog}: {message} (see {self.prog} --help)\n")


def _path(text: str) -> str:
    """argparse type of every path argument: text no file system can take (a name over 255
    bytes, a path over 4096) is refused here, before any command looks the path up."""
    from fastlt.paths import path_problem

    if (problem := path_problem(text)) is not None:
        raise argparse.ArgumentTypeError(f"{text[:60]!r}{'...' if len(text) > 60 else ''} cannot be a path: {problem}")
    return text


def _int_at_least(low: int):
    """argparse type: an int >= ``low`` (``--epoch -5`` is no epoch; ``--samples 0`` shows nothing)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}; got {value}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def _add_config_args(p: argparse.ArgumentParser, *, default_config: str | None = None) -> None:
    if default_config is None:
        p.add_argument("--config", required=True, type=_path,
                       help="YAML recipe path, or a shipped recipe's name (fastlt recipes), e.g. cifar100_lt_if100")
    else:
        p.add_argument("--config", default=default_config, type=_path, help=f"YAML recipe (default: {default_config})")
    p.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=0.05 method.l_d_warm=10 (repeatable)")


def _add_epochs_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, default=None, metavar="N",
                   help="shorten or lengthen the recipe to N epochs: warm-up, milestones, method.l_d_warm and the "
                        "evaluation/checkpoint cadence keep their share of the run (printed); --set still wins")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    _add_epochs_arg(p)
    p.add_argument("--resume", default=None, type=_path, metavar="auto|PATH",
                   help="auto: continue from the run directory's latest checkpoint; PATH: a checkpoint directory")


def build_parser() -> argparse.ArgumentParser:
    """The ``fastlt`` parser with its sub-commands."""
    from fastlt.demo import DEMO_CONFIG

    from fastlt import __version__

    p = _Parser(prog="fastlt", description="ConCutMix + BCL long-tailed training (DeepSpeed).")
    p.add_argument("--version", action="version", version=f"fastlt {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train_args(sub.add_parser("train", help="train from a YAML recipe (same as python -m fastlt.train)"))
    e = sub.add_parser("eval", help="evaluate a checkpoint on the val or test list")
    _add_config_args(e)
    e.add_argument("--checkpoint", required=True, type=_path,
                   help="best.pt / last.pt of a run, a checkpoint directory, or a run directory (its latest)")
    e.add_argument("--split", default="val", choices=("val", "test"))
    e.add_argument("--out", default=None, type=_path,
                   help="also write the metrics (with per-class accuracy) to this JSON file")
    e.add_argument("--report-dir", default=None, type=_path,
                   help="where the plots and per_class.csv go (default: eval_<split>/ in the checkpoint's "
                        "run directory)")
    d = sub.add_parser("demo", help="train ConCutMix on the cached synthetic long-tailed dataset and report accuracy")
    _add_config_args(d, default_config=str(DEMO_CONFIG))
    _add_epochs_arg(d)
    c = sub.add_parser("config", help="print the resolved config (YAML) and the DeepSpeed config it generates (JSON)")
    _add_config_args(c)
    _add_epochs_arg(c)
    c.add_argument("--world-size", type=int, default=1, metavar="W",
                   help="ranks the DeepSpeed config is generated for (default 1; a run uses its launcher's)")
    a = sub.add_parser("data", help="class histogram (text + PNG), shot groups and unreadable files of a dataset",
                       description="Exit code 1 when unreadable files were found.")
    a.add_argument("target", type=_path,
                   help="an image folder (root/train/<class>/... or root/<class>/...), a list file, or a config path "
                        "/ recipe name")
    a.add_argument("--root", default=None, type=_path,
                   help="list files: the folder the paths are relative to (default: the list's)")
    a.add_argument("--num-classes", type=_int_at_least(2), default=None, help="list files: C (default: max label + 1)")
    a.add_argument("--class-names", default=None, type=_path, help="list files: a file with one class name per line")
    a.add_argument("--out", default=None, type=_path, help="report folder (default: runs/data-<name>)")
    a.add_argument("--no-check", dest="check", action="store_false", help="skip the header check of every image")
    a.add_argument("--decode", action="store_true", help="decode every image fully, not just its header (slower)")
    a.add_argument("--workers", type=_int_at_least(1), default=8, help="threads reading the images (default 8)")
    a.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                   help="configs: override a value, as for train")
    i = sub.add_parser("inspect", help="render the ConCutMix label of mixed samples from the training pipeline "
                                       "(PNG grid + HTML page), or with --views a backend's training views")
    _add_config_args(i)
    i.add_argument("--checkpoint", default=None, type=_path,
                   help="best.pt / last.pt, a checkpoint directory or a run directory (required without --views)")
    i.add_argument("--out", default=None, type=_path,
                   help="output folder (default: inspect/ in the checkpoint's run directory; with --views: "
                        "runs/<run.name>-views)")
    i.add_argument("--samples", type=_int_at_least(1), default=None, help="samples to show (default 16; with --views 8)")
    i.add_argument("--epoch", type=_int_at_least(0), default=None,
                   help="epoch of the sample sequence (default: the checkpoint's; with --views 0)")
    i.add_argument("--views", action="store_true",
                   help="write the training views (PNG + .npz) of the first samples as --backend makes them")
    i.add_argument("--backend", default=None, choices=("dali", "torch"), help="with --views: the pipeline backend")
    i.add_argument("--compare", default=None, metavar="NPZ", type=_path,
                   help="with --views: the other backend's views_<backend>.npz; writes parity.json (mean/max |Δ|)")
    i.add_argument("--topk", type=_int_at_least(1), default=3,
                   help="classes of the rectified label to list per sample (default 3)")
    sub.add_parser("recipes", help="list the shipped recipes with their published top-1")
    x = sub.add_parser("export", help="write a trained model's backbone and classifier as timm-loadable safetensors")
    x.add_argument("--checkpoint", required=True, help="best.pt / last.pt, a checkpoint directory or a run directory")
    x.add_argument("--out", default=None, help="output folder (default: export/ in the checkpoint's run directory)")
    x.add_argument("--config", default=None,
                   help="the run's config, when it set model.backbone_kwargs (e.g. a ViT's img_size)")
    r = sub.add_parser("profile", help="record training steps with torch.profiler: Chrome/Perfetto trace, TensorBoard "
                                       "profile, top operators/kernels, kernel launches and host syncs per step")
    _add_config_args(r)
    r.add_argument("--steps", type=_int_at_least(1), default=5, help="training steps recorded (default 5)")
    r.add_argument("--warmup", type=_int_at_least(0), default=3, help="steps run before recording (default 3)")
    r.add_argument("--phase", default="rectified", metavar="area|rectified",
                   help="label phase: rectified (ConCutMix labels, after method.l_d_warm; default) or area (CutMix)")
    r.add_argument("--out", default=None, type=_path,
                   help="output folder (default: <run.output_dir>/<run.name>-profile/profile)")
    r.add_argument("--top", type=_int_at_least(1), default=15, help="rows of the self-time table (default 15)")
    return p


def _train_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m fastlt.train", description="Train ConCutMix + BCL (DeepSpeed).")
    _add_train_args(p)
    # The deepspeed launcher appends --local_rank=N; the rank is read from the environment instead.
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    # DeepSpeed's conventional arguments (deepspeed.add_config_arguments): every run is a DeepSpeed
    # run, so --deepspeed changes nothing; a --deepspeed_config JSON merges into deepspeed.extra.
    p.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--deepspeed_config", "--deepscale_config", default=None, metavar="JSON",
                   help="a DeepSpeed config file, merged into deepspeed.extra (keys fastlt derives from its own "
                        "settings, such as train_batch_size, are refused with the fastlt key to set instead)")
    return p


def _parse(parser: argparse.ArgumentParser, argv):
    """Parsed arguments, or the exit code of a refusal (already printed as one line), --help or --version."""
    try:
        return parser.parse_args(argv), None
    except SystemExit as e:  # in-process callers get the code, as from any command
        return None, (e.code if isinstance(e.code, int) else 2)


def train_main(argv: Sequence[str] | None = None) -> int:
    """``python -m fastlt.train`` / ``deepspeed --module fastlt.train``."""
    args, code = _parse(_train_parser(), argv)
    return code if args is None else train_command(args)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``fastlt`` console script."""
    args, code = _parse(build_parser(), argv)
    return code if args is None else COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
