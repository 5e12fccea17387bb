"""What each ``fastlt`` command does once its arguments are parsed (``fastlt.cli`` parses them):
loading the config a command names (``--set``, ``--epochs``, ``--deepspeed_config``), running it
under :func:`run_cli`, which turns every expected failure into one ``fastlt: error: ...`` line and
its exit code, and the run-directory lock of the commands that write into a run.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

__all__ = ["COMMANDS", "load_args_config", "run_cli", "train_command"]


def _overrides(args) -> list[str]:
    return [item for group in args.overrides for item in group]


def load_args_config(args):
    from fastlt.config.loader import load_config
    from fastlt.config.recipes import resolve_config

    epochs, notes = getattr(args, "epochs", None), []
    cfg = load_config(resolve_config(args.config), _overrides(args), epochs=epochs, notes=notes)
    if getattr(args, "deepspeed_config", None):
        cfg = _with_deepspeed_json(cfg, args.deepspeed_config)
    if epochs is not None and os.environ.get("RANK", "0") == "0":
        print(f"--epochs {epochs}: " + ("; ".join(notes) if notes else "the recipe already has that length"),
              flush=True)
    return cfg


def _with_deepspeed_json(cfg, path: str):
    """``cfg`` with the DeepSpeed config file ``path`` merged into ``deepspeed.extra`` (validated
    again, so keys fastlt owns are refused by name)."""
    import json

    from fastlt.config.loader import config_from_dict, config_to_dict
    from fastlt.errors import ConfigError
    from fastlt.paths import expect_file, read_regular

    # fastlt's one file-kind check: a folder, FIFO, socket or device is refused, never opened
    expect_file(path, "--deepspeed_config", error=ConfigError,
                missing=f"--deepspeed_config {path}: no such file; pass a DeepSpeed JSON config file")
    try:
        extra = json.loads(read_regular(path).decode("utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--deepspeed_config {path}: cannot be read as UTF-8 text ({e})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed_config {path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(extra, dict):
        raise ConfigError(f"--deepspeed_config {path}: the top level must be a JSON object of DeepSpeed settings")
    tree = config_to_dict(cfg)
    tree["deepspeed"]["extra"] = {**tree["deepspeed"]["extra"], **extra}
    return config_from_dict(tree)


def run_cli(fn: Callable[[], None], *, phase: str = "the command",
            after: str = "files already written are complete (each is written whole or not at all)") -> int:
    """Run fn() and turn the expected failures into one clear message and an exit code. SIGINT and
    SIGTERM stop it at any moment with 130 / 143 (``fastlt.training.signals``)."""
    from fastlt.errors import FastltError, TrainingInterrupted, exit_code
    from fastlt.training.signals import PhaseInterrupt, SecondInterrupt, StopFlag

    def is_rank0() -> bool:  # at the time of the message: a SLURM task learns its RANK during setup
        return os.environ.get("RANK", "0") == "0"

    def say(msg: str) -> None:
        if is_rank0():
            print(f"fastlt: error: {msg}", file=sys.stderr, flush=True)

    try:
        with StopFlag(phase=phase, after=after, stepwise=False):
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
    except BrokenPipeError:  # `fastlt config ... | head`: the reader left; end quietly, as other CLI tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's exit-time flush of stdout would fail again
        return 141  # 128 + SIGPIPE, the shell's code for a writer whose pipe closed
    except PhaseInterrupt as e:
        if is_rank0():
            print(f"fastlt: {e}", file=sys.stderr, flush=True)
        return 143 if e.signal_name == "SIGTERM" else 130
    except SecondInterrupt:
        say("aborted by a second Ctrl-C; checkpoints already written are complete (resume with --resume auto)")
        return 130
    except KeyboardInterrupt:  # a Ctrl-C that arrived before the handlers were installed
        if is_rank0():
            print("fastlt: interrupted by Ctrl-C; files already written are complete", file=sys.stderr, flush=True)
        return 130


def train_command(args) -> int:
    def go():
        from fastlt.training.run import train

        train(load_args_config(args), resume=args.resume)

    return run_cli(go, phase="setup", after="nothing was trained in this launch; start it again the same way")


def _owning_run_dir(path):
    """The run directory ``path`` lies in (itself or the nearest folder above it holding a run's lock,
    checkpoints or log), or None."""
    for folder in (path, *path.parents):
        if (folder / ".fastlt.lock").exists() or (folder / "checkpoints").is_dir() or (folder / "log.jsonl").is_file():
            return folder
    return None


def _run_dir_lock(run_dir, outputs, command: str):
    """The lock of the run directory ``run_dir`` (``fastlt.training.runlock``) when one of the
    ``outputs`` a command writes lies inside it, else a no-op: a report is never written into
    a run directory that a trainer (or another command) is writing."""
    import contextlib
    from pathlib import Path

    from fastlt.training.runlock import RunLock

    from fastlt.errors import OutputError

    run_dir = Path(run_dir).resolve()
    for o in outputs:  # a report never lands in *another* run's directory (it would replace that run's files)
        owner = None if o is None else _owning_run_dir(Path(o).resolve())
        if owner is not None and owner != run_dir:
            raise OutputError(f"{command}: {o} lies inside the run directory {owner}, which is not the checkpoint's "
                              f"run ({run_dir}); its report files would be replaced. Write into {run_dir} or a "
                              "folder outside any run directory")
    inside = [o for o in outputs if o is not None and Path(o).resolve().is_relative_to(run_dir)]
    if not inside or not run_dir.is_dir():
        return contextlib.nullcontext()
    return RunLock(run_dir, command, fix="write into another folder with --out" +
                   (" / --report-dir" if command == "fastlt eval" else ""))


def _eval(args) -> int:
    def go():
        from fastlt.training.evaluate import checkpoint_run_dir, run_eval, write_metrics
        from fastlt.files import check_output_file
        from fastlt.reports.logger import format_metrics
        from fastlt.reports.plots import write_eval_report

        run_dir = checkpoint_run_dir(args.checkpoint)
        report_dir = args.report_dir or run_dir / f"eval_{args.split}"
        with _run_dir_lock(run_dir, [report_dir, args.out], "fastlt eval"):
            if args.out:  # before the evaluation, not after it
                check_output_file(args.out, "--out", new=True)
            _check_out_dir(report_dir, "--report-dir")
            m = run_eval(load_args_config(args), args.checkpoint, args.split)
            print(f"{args.split} ({m['n']} images): {format_metrics(m)}")
            if args.out:
                write_metrics(m, args.out)
                print(f"metrics written to {args.out}")
            paths = write_eval_report(report_dir, m, run_dir / "log.jsonl")
            print(f"plots and per-class CSV: {', '.join(str(p) for p in paths)}")

    return run_cli(go)


def _check_out_dir(path, what: str) -> None:
    """OutputError unless ``path`` is, or can become, a writable folder (not a file)."""
    from fastlt.files import check_writable_dir

    check_writable_dir(path, what)


def _demo(args) -> int:
    def go():
        from fastlt.demo import run_demo

        name_given = any(o.startswith("run.name=") for o in _overrides(args))
        print(run_demo(load_args_config(args), name_given=name_given), flush=True)

    return run_cli(go)


def _data(args) -> int:
    found = []

    def go():
        from fastlt.reports.dataset_report import load_target, write_report

        if args.out:
            _check_out_dir(args.out, "--out")
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
    def views():
        from fastlt.errors import ConfigError
        from fastlt.reports.view_inspect import inspect_views

        if args.backend is None:
            raise ConfigError("inspect --views needs --backend dali or --backend torch")
        cfg = load_args_config(args)
        out = args.out or os.path.join(cfg.run.output_dir, f"{cfg.run.name}-views")
        paths, report = inspect_views(cfg, args.backend, out, samples=args.samples or 8, epoch=args.epoch or 0,
                                      compare=args.compare)
        print(f"views of {args.backend}: {', '.join(str(p) for p in paths)}", flush=True)
        if report is not None:
            a, b = report["backends"]
            for v in report["views"]:
                print(f"view {v['view']}: {a} vs {b}: mean |Δ| {v['mean_abs_diff']:.3f}, max |Δ| "
                      f"{v['max_abs_diff']} grey levels over {report['samples']} samples", flush=True)
            print("labels, λ and CutMix flags " + ("agree" if all(report["same"].values()) else
                                                  f"DIFFER: {report['same']}"), flush=True)

    def go():
        from fastlt.errors import ConfigError
        from fastlt.training.evaluate import checkpoint_run_dir
        from fastlt.reports.label_inspect import inspect_labels

        if args.checkpoint is None:
            raise ConfigError("inspect needs --checkpoint (or --views --backend dali|torch for the training views)")
        run_dir = checkpoint_run_dir(args.checkpoint)
        out = args.out or run_dir / "inspect"
        with _run_dir_lock(run_dir, [out], "fastlt inspect"):
            _check_out_dir(out, "--out")
            paths, rows = inspect_labels(load_args_config(args), args.checkpoint, out, samples=args.samples or 16,
                                         epoch=args.epoch, show_topk=args.topk)
        print(f"{len(rows)} mixed samples: {', '.join(str(p) for p in paths)}", flush=True)

    return run_cli(views if args.views else go)


def _config(args) -> int:
    def go():
        import json

        import yaml

        from fastlt.config.loader import config_to_dict
        from fastlt.errors import ConfigError
        from fastlt.training.engine import deepspeed_config

        if args.world_size < 1:
            raise ConfigError(f"--world-size: must be >= 1; got {args.world_size}")
        cfg = load_args_config(args)
        ds = deepspeed_config(cfg, args.world_size)  # before printing: a refused world size prints nothing else
        print("# resolved config (what a run saves as config.yaml)")
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        print(f"# DeepSpeed config for {args.world_size} rank(s) (what a run saves as ds_config.json"
              + ("; with ZeRO, a run adds zero_optimization.reduce_bucket_size, the model's parameter count)"
                 if cfg.deepspeed.zero_stage > 0 else ")"))
        print(json.dumps(ds, indent=2), flush=True)

    return run_cli(go)


def _export(args) -> int:
    def go():
        from fastlt.models.export import export_timm
        from fastlt.training.evaluate import checkpoint_run_dir

        if not os.environ.get("DS_ACCELERATOR"):  # the safe loader imports DeepSpeed: no accelerator probing
            import torch

            if not torch.cuda.is_available():
                os.environ["DS_ACCELERATOR"] = "cpu"
        kwargs = {}
        config = args.config
        run_config = checkpoint_run_dir(args.checkpoint) / "config.yaml"
        if config is None and run_config.is_file():
            # the run's own config: a backbone built with options (a ViT's img_size) needs them again
            config = str(run_config)
            print(f"model.backbone_kwargs from {run_config} (--config to choose another config)", flush=True)
        if config:
            from fastlt.config.loader import load_config
            from fastlt.config.recipes import resolve_config

            kwargs = dict(load_config(resolve_config(config)).model.backbone_kwargs)
        out = args.out or checkpoint_run_dir(args.checkpoint) / "export"
        files = export_timm(args.checkpoint, out, backbone_kwargs=kwargs)
        print(f"exported: {', '.join(str(f) for f in files)}", flush=True)

    return run_cli(go)


def _recipes(args) -> int:
    def go():
        from fastlt.config.recipes import format_recipes

        print(format_recipes(), flush=True)

    return run_cli(go)


def _profile(args) -> int:
    # Before torch loads: kineto's console lines (its USDT profiler_start / profiler_stop marks,
    # "gpuGetDeviceCount failed" on a machine without a GPU) stay off the console.
    from fastlt.reports.profiling import quiet_kineto

    quiet_kineto()

    def go():
        from fastlt.reports.profiling import format_report, profile_run

        if args.out:
            _check_out_dir(args.out, "--out")
        summary = profile_run(load_args_config(args), steps=args.steps, warmup=args.warmup, phase=args.phase, out=args.out,
                              top=args.top)
        print(format_report(summary), flush=True)

    return run_cli(go)


#: Sub-command name -> its function (``fastlt.cli.main`` dispatches through it).
COMMANDS = {"train": train_command, "eval": _eval, "demo": _demo, "data": _data, "inspect": _inspect,
            "recipes": _recipes, "profile": _profile, "config": _config, "export": _export}
