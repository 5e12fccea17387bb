"""The set-up checks of a run, in one place and in the order they run: :func:`preflight`.

``Trainer.__init__`` calls :func:`preflight` once, before any process group exists, before
DeepSpeed starts and before anything of the run is written. It reads top to bottom:

1. the device (:func:`check_device`: options that need CUDA are refused elsewhere);
2. the run directory (:func:`check_run_dir`: a writable folder, or one that can be created)
   and its lock (``fastlt.training.runlock``: one process per run directory, rank 0);
3. every folder and file the run will write (:func:`check_run_files`: ``checkpoints/``, the
   appended logs), naming the real cause (read-only, permission, no space);
4. the resume target (``fastlt.training.resume``: what ``--resume`` may name, so a finished
   run is never overwritten; the ``latest`` pointer is a tag name and nothing else);
5. the datasets and the training set's identity (``fastlt.training.resume.dataset_identity``),
   the batch size against the ranks, the backbone's name, ``model.pretrained``;
6. the epoch length (:func:`steps_per_epoch`) — the problems of 5 and 6 are reported together,
   in one message;
7. the checkpoint to resume (:func:`check_resume`): intact, in what it holds too, fits this
   model, world size and training set;
8. the validation images (:func:`check_val_images`: with ``data.on_error: raise`` a bad file
   stops the run now, not at the first evaluation).

Each failure is one :mod:`fastlt.errors` exception naming the file or the key and the fix; the
lock is then given back (and a run directory it created removed), so a refused run leaves
its run directory exactly as it was. The result is a :class:`Plan` the trainer builds on.
"""
from __future__ import annotations

import errno
import os
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fastlt.errors import BadImageError, CheckpointError, ConfigError, DataError, OutputError
from fastlt.files import check_writable_dir
from fastlt.training.checkpoint import CheckpointManager, model_signature
from fastlt.training.resume import ResumeTarget, check_dataset, dataset_identity, resume_target
from fastlt.training.runlock import RunLock
from fastlt.training.signals import pause_point

__all__ = ["Plan", "check_device", "check_resume", "check_run_dir", "check_run_files", "check_val_images",
           "config_signature", "preflight", "steps_per_epoch"]


@dataclass
class Plan:
    """What :func:`preflight` established: everything the trainer needs before it starts."""

    device: str
    proc: object
    run_dir: Path
    lock: RunLock | None
    ckpt: CheckpointManager
    target: ResumeTarget
    data: object
    dataset: dict
    """The training set's identity (``dataset_identity``), recorded in every checkpoint."""
    steps_per_epoch: int
    precision: object
    notes: list[str] = field(default_factory=list)
    """Warnings for the run's log (about the resumed checkpoint)."""


def preflight(cfg, *, resume: str | None, run_dir: Path, proc, command: str = "fastlt train",
              stop=None) -> Plan:
    """Every set-up check of a run, in the order of the module docstring; returns the Plan."""
    from fastlt.training.distributed import resolve_device
    from fastlt.training.engine import precision_of

    device = resolve_device(cfg.run.device)  # 1. device
    check_device(cfg, device)
    check_run_dir(run_dir)  # 2. run directory + lock
    lock = RunLock(run_dir, command).acquire() if proc.rank == 0 and cfg.run.lock else None
    try:
        check_run_files(run_dir)  # 3. every folder and file the run writes
        ckpt = CheckpointManager(run_dir / "checkpoints", keep_last=cfg.run.keep_last, rank=proc.rank,
                                 local_rank=proc.local_rank, world_size=proc.world_size,
                                 async_save=cfg.run.async_checkpoint)
        target = resume_target(ckpt, resume, run_dir)  # 4. resume target
        data, steps = _config_against_data(cfg, proc.world_size)  # 5.-6. datasets, epoch length, model
        identity = dataset_identity(data.train)
        notes = [] if target.path is None else check_resume(  # 7. the checkpoint to resume
            ckpt, target.path, cfg, num_classes=data.num_classes, steps_per_epoch=steps, dataset=identity)
        check_val_images(data.val, cfg.data.on_error, rank=proc.rank,  # 8. validation images
                         max_pixels=cfg.data.max_image_pixels)
        pause_point("setup", stop)
    except BaseException:
        if lock is not None:
            lock.release(remove_empty_dir=True)
        raise
    return Plan(device=device, proc=proc, run_dir=run_dir, lock=lock, ckpt=ckpt, target=target, data=data,
                dataset=identity, steps_per_epoch=steps, precision=precision_of(cfg.deepspeed), notes=notes)


def _config_against_data(cfg, world_size: int):
    """(datasets, steps per epoch): the checks of the config against the ranks and the dataset —
    batch size vs ranks, data.num_classes vs the dataset, an epoch without a complete step, the
    backbone's name, the pretrained file against the model — each run, so that one message names
    every problem they find (a shortened recipe is fixed in one relaunch, not one per problem)."""
    from fastlt.config.typed import Problems
    from fastlt.data.build import build_datasets
    from fastlt.models.bcl import check_backbone
    from fastlt.training.engine import deepspeed_config

    problems = Problems(catch=(ConfigError, DataError, CheckpointError),
                        where=f"in the config for this dataset and {world_size} rank(s)")
    problems.check(deepspeed_config, cfg, world_size)  # batch size vs ranks, before anything starts
    problems.check(check_backbone, cfg.model.backbone)  # a misspelt timm name: now, not after DeepSpeed starts
    data = problems.check(build_datasets, cfg, problems=problems)
    steps = None if data is None else problems.check(steps_per_epoch, cfg, len(data.train), world_size)
    if cfg.model.pretrained:  # read and fitted now: a refused file leaves the run directory untouched
        from fastlt.models.pretrained import check_pretrained, check_pretrained_path

        if data is not None and not problems.items:  # fitted to the model of the dataset's classes
            check_pretrained(cfg, data.num_classes)
        else:  # the model is not known yet: at least the file
            problems.check(check_pretrained_path, cfg.model.pretrained)
    problems.raise_if_any()
    return data, steps


#: Validation lists at least this long get progress lines while their headers are checked.
PROGRESS_FROM = 2000
_SHOW_FIRST = 3


def check_device(cfg, device: str) -> None:
    """ConfigError for options the device cannot run (``model.sync_bn`` off CUDA)."""
    if cfg.model.sync_bn and device != "cuda":
        raise ConfigError("model.sync_bn: torch's SyncBatchNorm runs on CUDA devices only, and this run is on "
                          f"{device}; set model.sync_bn=false (BatchNorm then normalises each rank's share, "
                          "as the reference's DataParallel does)")


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


_PROBE_BYTES = 1 << 16  # a file system with less room than this cannot take a checkpoint either
_APPENDED = ("train.log", "log.jsonl")


def _space_problem(folder: Path) -> OSError | None:
    """Write and remove a 64 KiB file in ``folder``, synced: an empty file fits on a full disk,
    data does not (ENOSPC, EDQUOT)."""
    tmp = folder / f".fastlt-space-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            left = memoryview(b"\0" * _PROBE_BYTES)
            while left:  # a nearly full disk takes part of a write, then refuses the rest
                left = left[os.write(fd, left):]
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        return e
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    return None


def check_run_files(run_dir: Path) -> None:
    """OutputError unless everything a run writes can be written: the run directory and its
    ``checkpoints/`` folder take new files and data, and the logs the run appends to are
    writable. Names the real cause (read-only, permission, immutable, the disk full)."""
    from fastlt.errors import REASONS

    folders = [(run_dir, "run directory (run.output_dir / run.name)"), (run_dir / "checkpoints", "checkpoint folder")]
    for folder, what in folders:
        check_writable_dir(folder, what)
    deepest = run_dir / "checkpoints"
    while not deepest.is_dir() and deepest != deepest.parent:  # other ranks: rank 0 may not have created it yet
        deepest = deepest.parent
    if (err := _space_problem(deepest)) is not None:
        raise OutputError(f"run directory (run.output_dir / run.name) {run_dir} cannot be written: {deepest} has no "
                          f"room for the run's files ({REASONS.get(err.errno, err.strerror)}, "
                          f"{errno.errorcode.get(err.errno, err.errno)}); make room or move run.output_dir")
    for name in _APPENDED:
        log = run_dir / name
        if log.exists():
            try:
                os.close(os.open(log, os.O_WRONLY | os.O_APPEND))
            except OSError as e:
                raise OutputError(f"{log} cannot be appended to: {REASONS.get(e.errno, e.strerror)} "
                                  f"({errno.errorcode.get(e.errno, e.errno)}); make it writable or choose another "
                                  "run.name") from None


def config_signature(cfg, num_classes: int) -> dict:
    """The model signature (``fastlt.training.checkpoint.model_signature``) of ``cfg``'s model, from a copy
    built on the meta device: shapes only, no memory, no initialisation cost."""
    import torch

    from fastlt.models import build_model

    with torch.device("meta"):
        model = build_model(cfg, num_classes)
    return model_signature(model, cfg)


def check_resume(ckpt: CheckpointManager, path: Path, cfg, *, num_classes: int, steps_per_epoch: int,
                 dataset: dict | None = None) -> list[str]:
    """Everything about resuming ``path`` that can be known before DeepSpeed starts.

    Raises CheckpointError for a damaged or incomplete checkpoint (naming the newest intact
    earlier one), another model or world size, or a mid-epoch position whose step no longer
    means the same images; DataError for another training set (``dataset``: its identity;
    ``fastlt.training.resume.check_dataset``). Returns warnings for the log (a missing RNG
    file: the continuation is then not bit-exact; a training set changed as allowed).
    """
    meta, missing_rng = ckpt.verify(path, world_size=ckpt.world_size)
    ckpt.check_compatible(path, meta, config_signature(cfg, num_classes), zero_stage=cfg.deepspeed.zero_stage)
    boundaries = [p for p in CheckpointManager(path.parent).complete()
                  if p.name.endswith("_step000000") and p.name < path.name]
    notes = [] if dataset is None else check_dataset(path, meta, dataset, allow_change=cfg.run.allow_data_change,
                                                     boundary=boundaries[-1] if boundaries else None)
    epoch, step = int(meta.get("epoch", 0)), int(meta.get("step", 0))
    old_batch, old_steps = meta.get("batch_size"), meta.get("steps_per_epoch")
    if step > 0 and ((old_batch is not None and old_batch != cfg.data.batch_size) or step >= steps_per_epoch):
        boundary = boundaries
        fix = (f"--set data.batch_size={old_batch} (change it at the next epoch boundary)" if old_batch is not None
               else "the batch size and max_steps_per_epoch it was written with")
        alt = f", or resume the epoch boundary before it with --resume {boundary[-1]}" if boundary else ""
        raise CheckpointError(
            f"checkpoint {path} stopped inside epoch {epoch} at step {step} of {old_steps or '?'} steps of "
            f"data.batch_size={old_batch if old_batch is not None else '?'}; this config has data.batch_size="
            f"{cfg.data.batch_size} ({steps_per_epoch} steps per epoch), so step {step} would not mean the same "
            f"images and part of the epoch would be skipped or repeated. Resume it with {fix}{alt}")
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
    pool = ThreadPoolExecutor(max_workers=8)
    try:
        for k, why in enumerate(pool.map(lambda i: _header_problem(dataset, i, max_pixels or DEFAULT_MAX_IMAGE_PIXELS), range(n), chunksize=64)):
            if why is not None:
                bad.append((k, why))
            if every and (k + 1) % every == 0:
                print(f"  {k + 1}/{n} validation images checked, {len(bad)} unreadable", file=out, flush=True)
    finally:  # a stop request (fastlt.training.signals) must not wait for the reads still queued
        pool.shutdown(wait=True, cancel_futures=True)
    if bad:
        first = "; ".join(f"{image_source_name(dataset, i)}: {why}" for i, why in bad[:_SHOW_FIRST])
        key = "data.val_dir" if hasattr(dataset, "class_names") and not hasattr(dataset, "list_file") else "data.val_list"
        raise BadImageError(f"{key}: {len(bad)} of {n} validation image(s) cannot be read, so the first "
                            f"evaluation would stop the run (data.on_error: raise): {first}. Fix or remove the "
                            "file(s), or set data.on_error: skip to leave them out of evaluation")
