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


def record_evaluation(trainer, epoch: int, metrics: dict) -> Path | None:
    """On rank 0, write the finished evaluation of ``epoch`` with the trainer's history and best
    after it, for the checkpoint saved at the end of that epoch (none when no checkpoint was
    saved for it: the record then matches no checkpoint)."""
    if trainer.rank != 0:
        return None
    from fastlt.training.checkpoint import tag_for

    ckpt = trainer.ckpt.dir / tag_for(epoch + 1, 0)
    path = _file(trainer.run_dir, epoch)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json_text({"epoch": epoch, "checkpoint": _identity(ckpt if ckpt.is_dir() else None),
                                       "metrics": metrics, "history": trainer.history, "best": trainer.best}))
    return path


def pending_evaluation(trainer, epoch: int) -> None:
    """The evaluation of ``epoch`` that the checkpoint ``trainer`` resumed from was saved before:
    the recorded result when every rank finds it, else the evaluation runs now (all ranks agree,
    as the evaluation gathers over them)."""
    from fastlt.training import distributed as dist

    rec = recorded_evaluation(trainer.run_dir, epoch, trainer.resumed_ckpt)
    if dist.any_rank([rec is None], trainer.dev)[0]:
        trainer.evaluate(epoch)
        return
    trainer.last_eval, trainer.history, trainer.best = rec["metrics"], rec["history"], rec["best"]
    trainer.log.info(f"the evaluation of epoch {epoch} already ran after checkpoint {trainer.resumed_ckpt.name}: "
                     f"its result is taken from {rec['file']} (not evaluated again)")


def _nan(x):
    """JSON null back to nan (json_text wrote an empty shot group's nan as null)."""
    if x is None:
        return math.nan
    if isinstance(x, list):
        return [_nan(v) for v in x]
    return x


def _restore(d: dict) -> dict:
    return {k: (_nan(v) if k in ("overall", "many", "medium", "few", "per_class") else v) for k, v in d.items()}


def recorded_evaluation(run_dir: Path, epoch: int, checkpoint: Path) -> dict | None:
    """The recorded evaluation of ``epoch`` if it completes exactly ``checkpoint``, else None.
    Returns {"metrics", "history", "best"} with nan restored where the record holds null."""
    path = _file(run_dir, epoch)
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none, or damaged: evaluate again
        return None
    ident = _identity(checkpoint)
    if not isinstance(rec, dict) or ident is None or rec.get("epoch") != epoch or rec.get("checkpoint") != ident:
        return None
    try:
        return {"metrics": _restore(rec["metrics"]), "history": [_restore(h) for h in rec["history"]],
                "best": None if rec["best"] is None else _restore(rec["best"]), "file": path}
    except (KeyError, TypeError, AttributeError):
        return None
