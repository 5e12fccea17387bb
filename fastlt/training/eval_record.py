"""Evaluations that a resume must not run again.

An epoch's checkpoint is written *before* its evaluation (so a failing or interrupted
evaluation never loses the epoch) and records ``eval_pending``; a resume from it runs that
evaluation first. Once the evaluation has finished, rank 0 writes its result to
``run_dir/evaluations/epochNNNN.json`` (atomically): the metrics (per class too, which the
final report plots), the run's history and best after it, and the identity of the checkpoint
it completes — the tag and the save time in that checkpoint's ``meta.json``. A resume from
that same checkpoint takes the recorded result instead of evaluating again (a finished run
resumed with ``--resume auto`` rewrites its report without a second evaluation). A record of
another checkpoint — an older timeline re-run over newer checkpoints, a checkpoint saved again
at the same position — does not match and the evaluation runs.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from fastlt.errors import FastltError
from fastlt.files import json_text, write_text_atomic
from fastlt.training.checkpoint_format import read_meta

__all__ = ["EVAL_DIR", "pending_evaluation", "record_evaluation", "recorded_evaluation"]

EVAL_DIR = "evaluations"


def _file(run_dir: Path, epoch: int) -> Path:
    return Path(run_dir) / EVAL_DIR / f"epoch{epoch:04d}.json"


def _identity(checkpoint: Path | None) -> dict | None:
    if checkpoint is None:
        return None
    try:
        meta = read_meta(checkpoint)
    except Exception:  # noqa: BLE001 - an unreadable checkpoint completes no evaluation
        return None
    return {"tag": Path(checkpoint).name, "time": meta.get("time")}


def record_evaluation(trainer, epoch: int, metrics: dict, checkpoint: Path | None) -> Path | None:
    """On rank 0, write the finished evaluation of ``epoch`` with the trainer's history and best
    after it, for ``checkpoint``: the one saved right before this evaluation (None when this epoch
    saved none: the record then matches no checkpoint, as a folder of that name may be another
    timeline's). A record that cannot be written only costs a second evaluation on a resume: it is
    reported and the run goes on."""
    if trainer.rank != 0:
        return None
    path = _file(trainer.run_dir, epoch)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json_text({"epoch": epoch, "checkpoint": _identity(checkpoint), "metrics": metrics,
                                           "history": trainer.history, "best": trainer.best}))
    except (OSError, FastltError) as e:
        trainer.log.event("warning", f"warning: the record of the evaluation of epoch {epoch} was not written ({e}); "
                                     "a resume from its checkpoint evaluates it again")
        return None
    return path


def pending_evaluation(trainer, epoch: int) -> None:
    """The evaluation of ``epoch`` that the checkpoint ``trainer`` resumed from was saved before:
    the recorded result when every rank finds it, else the evaluation runs now (all ranks agree,
    as the evaluation gathers over them)."""
    from fastlt.training import distributed as dist

    rec = recorded_evaluation(trainer.run_dir, epoch, trainer.resumed_ckpt, trainer.data.num_classes)
    if dist.any_rank([rec is None], trainer.dev)[0]:
        trainer.evaluate(epoch, trainer.resumed_ckpt)
        return
    trainer.last_eval, trainer.history, trainer.best = rec["metrics"], rec["history"], rec["best"]
    trainer.log.info(f"the evaluation of epoch {epoch} already ran after checkpoint {trainer.resumed_ckpt.name}: "
                     f"its result is taken from {rec['file']} (not evaluated again)")


_GROUPS = ("overall", "many", "medium", "few")


def _number(x) -> float:
    """A recorded accuracy: a number, or null for an empty shot group (nan). TypeError otherwise."""
    if x is None:
        return math.nan
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"not a number: {x!r}")
    return float(x)


def _summary(d) -> dict:
    """A history or best entry: its epoch and the four accuracies, checked."""
    if not isinstance(d, dict) or isinstance(d.get("epoch"), bool) or not isinstance(d.get("epoch"), int):
        raise TypeError(f"not an evaluation summary: {d!r}")
    return {**d, "epoch": d["epoch"], **{k: _number(d[k]) for k in _GROUPS}}


def _metrics(d, num_classes: int) -> dict:
    per_class = d["per_class"]
    if not isinstance(per_class, list) or len(per_class) != num_classes:
        raise TypeError(f"per_class is not a list of {num_classes} accuracies")
    return {**d, **{k: _number(d[k]) for k in _GROUPS}, "per_class": [_number(v) for v in per_class]}


def recorded_evaluation(run_dir: Path, epoch: int, checkpoint: Path, num_classes: int) -> dict | None:
    """The recorded evaluation of ``epoch`` if it completes exactly ``checkpoint`` and holds what an
    evaluation of ``num_classes`` classes gives, else None (the evaluation then runs again).
    Returns {"metrics", "history", "best", "file"} with nan where the record holds null."""
    path = _file(run_dir, epoch)
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none, unreadable or damaged
        return None
    ident = _identity(checkpoint)
    if not isinstance(rec, dict) or ident is None or rec.get("epoch") != epoch or rec.get("checkpoint") != ident:
        return None
    try:  # a record edited by hand or damaged in its values: evaluate again rather than trust it
        history = [_summary(h) for h in rec["history"]]
        if not isinstance(rec["history"], list) or not any(h["epoch"] == epoch for h in history):
            return None
        return {"metrics": _metrics(rec["metrics"], num_classes), "history": history,
                "best": None if rec["best"] is None else _summary(rec["best"]), "file": path}
    except (KeyError, TypeError, AttributeError):
        return None
