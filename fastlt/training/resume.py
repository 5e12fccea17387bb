"""What a run may resume, decided before anything is written (called by ``fastlt.training.preflight``).

The rules, which keep a finished run from ever being overwritten:

* no ``--resume``: the run directory must hold neither checkpoints nor results (``best.pt``,
  ``last.pt``, ``metrics.json``); logs of an attempt that never reached a checkpoint are fine;
* ``--resume auto`` or a checkpoint of this run's own ``checkpoints/``: the run continues;
  ``auto`` without a checkpoint starts from scratch only where there are no results either;
* ``--resume PATH`` naming a checkpoint of *another* run (or a copy anywhere else): a **new
  run initialised from it**, allowed only into a run directory that holds nothing yet. It
  continues the checkpoint's position, weights and optimizer state, writes into its own
  directory only, and records its lineage (the checkpoint, its run, its position) in every
  checkpoint's ``meta.json``, in ``metrics.json`` and at the top of ``config.yaml``. Anything
  else is refused with one line.

Dataset identity: every checkpoint records the training set it was trained on
(:func:`dataset_identity`: image count, class counts and a digest of the index — paths and
labels in order, or the pixels and labels of an in-memory set). :func:`check_dataset` refuses
a mid-epoch resume on another training set (the saved step would not mean the same images)
and an epoch-boundary resume unless ``run.allow_data_change: true``, which is then logged.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastlt.errors import CheckpointError, DataError
from fastlt.training.checkpoint import CheckpointManager
from fastlt.training.runlock import LOCK_FILE

__all__ = ["RESULT_FILES", "ResumeTarget", "check_dataset", "dataset_identity", "lineage_comment", "resume_target",
           "resume_hint", "write_run_config"]

#: Files that make a run directory hold a run's results.
RESULT_FILES = ("best.pt", "last.pt", "metrics.json")
_SHOW = 3


@dataclass
class ResumeTarget:
    """The checkpoint to resume (None: from scratch); ``foreign``: a new run initialised from
    another run's checkpoint; ``lineage``: what this run descends from (None: nothing)."""

    path: Path | None = None
    foreign: bool = False
    lineage: dict | None = None


def _source_run(path: Path) -> Path:
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def _contents(run_dir: Path) -> list[str]:
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE)


def resume_target(ckpt: CheckpointManager, resume: str | None, run_dir: Path) -> ResumeTarget:
    """The checkpoint ``--resume`` names under the rules of the module docstring, or CheckpointError."""
    results = [f for f in RESULT_FILES if (run_dir / f).exists()]
    if resume is None:
        existing = ckpt.complete()
        if existing:
            raise CheckpointError(f"run directory {run_dir} already holds checkpoints (newest: {existing[-1].name}); "
                                  "pass --resume auto to continue that run, or choose a new run.name / run.output_dir")
        if results:
            raise CheckpointError(f"run directory {run_dir} already holds the results of a run ({', '.join(results)}) "
                                  "and a new run would replace them; choose a new run.name / run.output_dir")
        return ResumeTarget()
    path = CheckpointManager.resolve(resume, run_dir)
    if path is None:
        if results:
            raise CheckpointError(f"--resume {resume}: run directory {run_dir} holds the results of a run "
                                  f"({', '.join(results)}) but no checkpoint to continue it from; starting it again "
                                  "would replace them: choose a new run.name / run.output_dir")
        return ResumeTarget()
    from fastlt.training.checkpoint_format import read_meta

    if path.resolve().parent == ckpt.dir.resolve():
        try:
            lineage = read_meta(path).get("lineage")
        except CheckpointError:  # damaged: check_resume says so, naming the newest intact checkpoint
            lineage = None
        return ResumeTarget(path, lineage=lineage)
    source = _source_run(path.resolve())
    held = _contents(run_dir)
    if held:
        shown = ", ".join(held[:_SHOW]) + (", ..." if len(held) > _SHOW else "")
        raise CheckpointError(
            f"--resume {resume}: {path} is a checkpoint of another run ({source}), and this run's directory "
            f"{run_dir} already holds {shown}: resuming it here would overwrite them. Continue that run with its "
            f"own run.output_dir / run.name and --resume auto, or start a new run from the checkpoint with a "
            "run.name whose directory does not exist yet")
    meta = read_meta(path)
    lineage = {"initialised_from": str(path.resolve()), "source_run": str(source), "epoch": meta.get("epoch"),
               "step": meta.get("step")}
    if meta.get("lineage"):
        lineage["source_lineage"] = meta["lineage"]
    return ResumeTarget(path, foreign=True, lineage=lineage)


def lineage_comment(lineage: dict | None) -> str:
    """The line config.yaml starts with for a run initialised from another run's checkpoint."""
    if not lineage:
        return ""
    return (f"# lineage: initialised from checkpoint {lineage['initialised_from']} (run {lineage['source_run']}, "
            f"epoch {lineage['epoch']} step {lineage['step']})\n")


def resume_hint(ckpt: CheckpointManager, epoch: int) -> str:
    """What ``--resume auto`` does after a stop during the evaluation of ``epoch``."""
    from fastlt.training.checkpoint_format import tag_for

    latest = ckpt.latest()
    if latest is None:
        return "no checkpoint was written yet: start the run again"
    first = " and runs this evaluation first" if latest.name == tag_for(epoch + 1, 0) else ""
    return f"checkpoint {latest} is complete: continue with --resume auto (it continues from there{first})"


def write_run_config(cfg, run_dir: Path, lineage: dict | None) -> list[str]:
    """Write the run's config.yaml (``save_resolved_config``: returns what changed since the last
    launch), headed by the lineage line of a run initialised from another run's checkpoint."""
    from fastlt.config.loader import save_resolved_config
    from fastlt.files import write_text_atomic

    path = run_dir / "config.yaml"
    changed = save_resolved_config(cfg, path)
    if comment := lineage_comment(lineage):
        write_text_atomic(path, comment + path.read_text(encoding="utf-8"))
    return changed


def dataset_identity(train) -> dict:
    """Image count, class counts and a SHA-256 of the training set's index (see the module docstring)."""
    h = hashlib.sha256()
    labels = np.asarray(train.labels, dtype=np.int64)
    paths = getattr(train, "paths", None)
    if paths is not None:
        h.update("\n".join(f"{p}\t{int(y)}" for p, y in zip(paths, labels.tolist())).encode("utf-8", "surrogatepass"))
    else:
        images = getattr(train, "images", None)
        if images is not None:
            h.update(repr(tuple(images.shape)).encode())
            h.update(np.ascontiguousarray(images).data)
        h.update(labels.tobytes())
    counts = np.asarray(train.class_counts, dtype=np.int64)
    return {"images": int(labels.size), "class_counts": [int(c) for c in counts], "digest": h.hexdigest()}


def _difference(old: dict, new: dict) -> str:
    parts = []
    if old["images"] != new["images"]:
        parts.append(f"{old['images']} -> {new['images']} images")
    a, b = old["class_counts"], new["class_counts"]
    if len(a) != len(b):
        parts.append(f"{len(a)} -> {len(b)} classes")
    else:
        changed = [f"class {j}: {x} -> {y}" for j, (x, y) in enumerate(zip(a, b)) if x != y]
        if changed:
            parts.append(f"{len(changed)} class count(s) changed ({', '.join(changed[:_SHOW])}"
                         + (", ..." if len(changed) > _SHOW else "") + ")")
    if not parts:
        parts.append("the same counts but other files or another order (the index digest differs)")
    return "; ".join(parts)


def check_dataset(path: Path, meta: dict, identity: dict, *, allow_change: bool, boundary: Path | None) -> list[str]:
    """Notes for the log, or DataError when resuming checkpoint ``path`` (its ``meta``) on the
    training set ``identity`` is refused (see the module docstring). ``boundary``: the newest
    epoch-boundary checkpoint before a mid-epoch one, offered in the message."""
    old = meta.get("dataset")
    if not old or (old["images"], old["class_counts"], old["digest"]) == (
            identity["images"], identity["class_counts"], identity["digest"]):
        return []
    what = _difference(old, identity)
    epoch, step = meta.get("epoch", 0), meta.get("step", 0)
    if step:
        alt = (f", or resume the epoch boundary before it (--resume {boundary} with --set run.allow_data_change=true)"
               if boundary is not None else "")
        raise DataError(f"checkpoint {path} stopped inside epoch {epoch} at step {step}, and the training set has "
                        f"changed since it was written ({what}): step {step} would not mean the same images. Restore "
                        f"the training set it was trained on{alt}")
    if not allow_change:
        raise DataError(f"checkpoint {path} (epoch {epoch}) was trained on another training set ({what}); restore "
                        "it, or continue on the new one from this epoch boundary with --set run.allow_data_change=true "
                        "(the class counts, the logit-adjustment prior and the sampler then follow the new set)")
    return [f"warning: the training set changed since checkpoint {path} ({what}); continuing on the new one from "
            f"epoch {epoch} as run.allow_data_change=true allows"]
