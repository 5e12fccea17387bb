"""Checks that run before a training run starts DeepSpeed or writes anything (``Trainer.__init__``).

* :func:`check_device` — options that need a CUDA device are refused elsewhere;
* :func:`check_run_dir` — the run directory is (or can become) a writable folder;
* :func:`resolve_resume` — the checkpoint ``--resume`` names (none: the run directory must not
  hold checkpoints already);
* :func:`steps_per_epoch` — the epoch length, or a DataError naming the batch size;
* :func:`check_resume` — the checkpoint to resume is intact (``CheckpointManager.verify``), fits
  this model and world size, and a mid-epoch position still means the same images;
* :func:`check_val_images` — every validation image has a readable header, so that with
  ``data.on_error: raise`` a bad file stops the run now, not at the first evaluation.

Each failure is one :mod:`fastlt.errors` exception naming the file or the key and the fix; as
they all run first, a refused run leaves its run directory exactly as it was.
"""
from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastlt.training.checkpoint import CheckpointManager, model_signature
from fastlt.errors import BadImageError, CheckpointError, ConfigError, DataError
from fastlt.files import check_writable_dir

__all__ = ["check_device", "check_resume", "check_run_dir", "check_val_images", "config_signature",
           "resolve_resume", "steps_per_epoch"]

#: Validation lists at least this long get progress lines while their headers are checked.
PROGRESS_FROM = 2000
_SHOW_FIRST = 3


def check_device(cfg, device: str) -> None:
    """ConfigError for options the device cannot run (``model.sync_bn`` off CUDA)."""
    if cfg.model.sync_bn and device != "cuda":
        raise ConfigError("model.sync_bn: torch's SyncBatchNorm runs on CUDA devices only, and this run is on "
                          f"{device}; set model.sync_bn=false (BatchNorm then normalises each rank's share, "
                          "as the reference's DataParallel does)")


def resolve_resume(ckpt: CheckpointManager, resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint to resume (``--resume auto|PATH``); without ``--resume`` a run directory that
    already holds checkpoints is refused (continuing it silently would mix two runs)."""
    existing = ckpt.complete() if ckpt.dir.is_dir() else []
    if resume is None:
        if existing:
            raise CheckpointError(f"run directory {run_dir} already holds checkpoints (newest: {existing[-1].name}); "
                                  "pass --resume auto to continue that run, or choose a new run.name / run.output_dir")
        return None
    return CheckpointManager.resolve(resume, run_dir)


def steps_per_epoch(cfg, num_train: int, world_size: int) -> int:
    """Steps of one epoch: whole global batches of data.batch_size samples (the sampling's
    step-major shards), capped by run.max_steps_per_epoch, in whole optimizer steps (a partial
    accumulation at the end of an epoch would carry gradients into the next epoch and into no
    checkpoint)."""
    from fastlt.method.sampling import steps_per_epoch as whole_steps

    steps = whole_steps(num_train, cfg.data.batch_size // world_size, world_size)
    if cfg.run.max_steps_per_epoch:
        steps = min(steps, cfg.run.max_steps_per_epoch)
    steps -= steps % cfg.deepspeed.grad_accum_steps
    if steps <= 0:
        raise DataError(f"data.batch_size={cfg.data.batch_size} leaves an epoch without a complete step: "
                        f"{num_train} training images over {world_size} rank(s) "
                        f"(× deepspeed.grad_accum_steps={cfg.deepspeed.grad_accum_steps}); lower data.batch_size")
    return steps


def check_run_dir(run_dir: Path) -> None:
    """OutputError unless the run directory exists as a writable folder or can be created."""
    check_writable_dir(run_dir, "run directory (run.output_dir / run.name)")


def config_signature(cfg, num_classes: int) -> dict:
    """The model signature (``fastlt.training.checkpoint.model_signature``) of ``cfg``'s model, from a copy
    built on the meta device: shapes only, no memory, no initialisation cost."""
    import torch

    from fastlt.models import build_model

    with torch.device("meta"):
        model = build_model(cfg, num_classes)
    return model_signature(model, cfg)


def check_resume(ckpt: CheckpointManager, path: Path, cfg, *, num_classes: int, steps_per_epoch: int) -> list[str]:
    """Everything about resuming ``path`` that can be known before DeepSpeed starts.

    Raises CheckpointError for a damaged or incomplete checkpoint (naming the newest intact
    earlier one), another model or world size, or a mid-epoch position whose step no longer
    means the same images. Returns warnings for the log (a missing RNG file: the continuation
    is then not bit-exact).
    """
    meta, missing_rng = ckpt.verify(path, world_size=ckpt.world_size)
    ckpt.check_compatible(path, meta, config_signature(cfg, num_classes), zero_stage=cfg.deepspeed.zero_stage)
    epoch, step = int(meta.get("epoch", 0)), int(meta.get("step", 0))
    old_batch, old_steps = meta.get("batch_size"), meta.get("steps_per_epoch")
    if step > 0 and ((old_batch is not None and old_batch != cfg.data.batch_size) or step >= steps_per_epoch):
        boundary = [p for p in ckpt.complete() if p.name.endswith("_step000000") and p.name < path.name]
        fix = (f"--set data.batch_size={old_batch} (change it at the next epoch boundary)" if old_batch is not None
               else "the batch size and max_steps_per_epoch it was written with")
        alt = f", or resume the epoch boundary before it with --resume {boundary[-1]}" if boundary else ""
        raise CheckpointError(
            f"checkpoint {path} stopped inside epoch {epoch} at step {step} of {old_steps or '?'} steps of "
            f"data.batch_size={old_batch if old_batch is not None else '?'}; this config has data.batch_size="
            f"{cfg.data.batch_size} ({steps_per_epoch} steps per epoch), so step {step} would not mean the same "
            f"images and part of the epoch would be skipped or repeated. Resume it with {fix}{alt}")
    notes = []
    written = meta.get("world_size")
    if written and written != ckpt.world_size:
        notes.append(f"note: checkpoint {path} was written by {written} rank(s) and this run has {ckpt.world_size}: "
                     "the sample sequence, CutMix boxes and augmentations are the same (they are keyed by the global "
                     f"step and sample position); data.batch_size={cfg.data.batch_size} is now split over "
                     f"{ckpt.world_size} rank(s)"
                     + (f", and ranks {written}..{ckpt.world_size - 1} start their torch/numpy generators from "
                        "run.seed" if ckpt.world_size > written else ""))
    if missing_rng:
        notes.append(f"warning: checkpoint {path} has no {', '.join(missing_rng)}: the torch/numpy/python random "
                     "generators are not restored, so this continuation is not bit-exact (the sample order, CutMix "
                     "boxes and augmentations are keyed by run.seed and stay the same)")
    return notes


def _header_problem(dataset, i: int, max_pixels: int) -> str | None:
    from fastlt.pipelines.common import check_encoded_image

    try:
        check_encoded_image(dataset.read_bytes(i), max_pixels)
    except (OSError, ValueError) as e:
        return "the file does not exist" if isinstance(e, FileNotFoundError) else f"{type(e).__name__}: {e}"
    return None


def check_val_images(dataset, on_error: str, *, rank: int = 0, out=None, max_pixels: int | None = None) -> None:
    """With ``on_error: raise``, BadImageError naming every validation image whose header cannot
    be read (missing, empty, truncated, not an image, over ``max_pixels``). Rank 0 checks the whole list (the others
    wait for it in the process group); reads run on a few threads, as on a network file system
    the time is in the reads."""
    if on_error != "raise" or rank != 0 or not hasattr(dataset, "read_bytes"):
        return
    from fastlt.pipelines.common import DEFAULT_MAX_IMAGE_PIXELS, image_source_name

    out = out or sys.stdout
    n = len(dataset)
    every = max(1, n // 4) if n >= PROGRESS_FROM else 0
    if every:
        print(f"checking the headers of {n} validation images (data.on_error: raise) ...", file=out, flush=True)
    bad = []
    with ThreadPoolExecutor(max_workers=8) as pool:
        for k, why in enumerate(pool.map(lambda i: _header_problem(dataset, i, max_pixels or DEFAULT_MAX_IMAGE_PIXELS), range(n), chunksize=64)):
            if why is not None:
                bad.append((k, why))
            if every and (k + 1) % every == 0:
                print(f"  {k + 1}/{n} validation images checked, {len(bad)} unreadable", file=out, flush=True)
    if bad:
        first = "; ".join(f"{image_source_name(dataset, i)}: {why}" for i, why in bad[:_SHOW_FIRST])
        key = "data.val_dir" if hasattr(dataset, "class_names") and not hasattr(dataset, "list_file") else "data.val_list"
        raise BadImageError(f"{key}: {len(bad)} of {n} validation image(s) cannot be read, so the first "
                            f"evaluation would stop the run (data.on_error: raise): {first}. Fix or remove the "
                            "file(s), or set data.on_error: skip to leave them out of evaluation")
