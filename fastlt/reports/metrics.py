"""Evaluation metrics (docs/design.md §1, "Evaluation"): top-1 on the balanced split and
many-shot (N_j > 100), medium-shot (20 ≤ N_j ≤ 100) and few-shot (N_j < 20) accuracy.

Group accuracies are averages of per-class accuracies within the group, so that a group's
figure does not depend on how many evaluation images each class happens to have; on the
balanced val/test splits this equals the sample average.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

__all__ = ["DEFAULT_SHOTS", "FEW_SHOT", "MANY_SHOT", "Shots", "shot_accuracy", "shot_group", "shots_of"]

#: Many-shot classes have more than MANY_SHOT training images, few-shot ones fewer than FEW_SHOT
#: (the long-tail convention; ``run.many_shot`` / ``run.few_shot`` change them for a run).
MANY_SHOT, FEW_SHOT = 100, 20


class Shots(NamedTuple):
    """The shot-group thresholds: many-shot above ``many`` training images, few-shot below ``few``."""

    many: int = MANY_SHOT
    few: int = FEW_SHOT


DEFAULT_SHOTS = Shots()


def shot_group(count: int, shots: Shots = DEFAULT_SHOTS) -> str:
    """many (> shots.many training images), medium or few (< shots.few)."""
    return "many" if count > shots.many else ("few" if count < shots.few else "medium")


def shots_of(metrics: dict) -> Shots:
    """The thresholds a metrics dict was computed with (the convention for older files)."""
    t = metrics.get("shot_thresholds") or {}
    return Shots(int(t.get("many", MANY_SHOT)), int(t.get("few", FEW_SHOT)))


def _as_int_array(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"shot_accuracy: {name} must be 1-D; got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"shot_accuracy: {name} must hold class indices (integers); got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def shot_accuracy(preds, labels, train_class_counts, many: int = MANY_SHOT, few: int = FEW_SHOT) -> dict:
    """Top-1 accuracy overall and per shot group, in percent.

    Args:
        preds: (N,) predicted classes (tensor or array).
        labels: (N,) true classes.
        train_class_counts: (C,) training images per class; decides the groups.
        many: classes with more than ``many`` training images are many-shot.
        few: classes with fewer than ``few`` training images are few-shot; the rest medium.

    Returns:
        ``{"overall", "many", "medium", "few"}`` as floats (nan for a group with no evaluated
        class) and ``"per_class"``, a list of C floats (nan for classes absent from ``labels``).
    """
    preds = _as_int_array(preds, "preds")
    labels = _as_int_array(labels, "labels")
    counts = _as_int_array(train_class_counts, "train_class_counts")
    if preds.shape != labels.shape:
        raise ValueError(f"shot_accuracy: preds {preds.shape} and labels {labels.shape} differ in length")
    if labels.size == 0:
        raise ValueError("shot_accuracy: no samples to evaluate")
    num_classes = counts.size
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"shot_accuracy: labels must lie in [0, {num_classes}); got range "
                         f"[{labels.min()}, {labels.max()}]")
    if few > many + 1:  # few = many + 1 leaves the medium group empty; more would overlap many and few
        raise ValueError(f"shot_accuracy: few ({few}) must not exceed many + 1 ({many + 1})")
    total = np.bincount(labels, minlength=num_classes)
    correct = np.bincount(labels[preds == labels], minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(total > 0, 100.0 * correct / np.maximum(total, 1), np.nan)
    evaluated = total > 0
    groups = {"many": counts > many, "medium": (counts <= many) & (counts >= few), "few": counts < few}
    out = {"overall": float(100.0 * (preds == labels).mean())}
    for name, member in groups.items():
        sel = member & evaluated
        out[name] = float(per_class[sel].mean()) if sel.any() else math.nan
    out["per_class"] = [float(v) for v in per_class]
    out["shot_thresholds"] = {"many": int(many), "few": int(few)}
    return out
