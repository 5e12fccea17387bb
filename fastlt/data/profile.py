"""Long-tailed class-count profiles (docs/design.md §2) and the argument checks the dataset
modules share.

Imbalance convention: ``imb_factor`` is the ratio n_min / n_max ≤ 1, as in the LDAM-DRW / BCL
code (``imb_factor=0.01`` is "IF 100" in the papers' tables). Class c keeps
⌊n_max · imb_factor^(c/(C−1))⌋ images, which is docs/design.md §2's ⌊n_max · IF^(−c/(C−1))⌋
with IF = 1/imb_factor.
"""
from __future__ import annotations

import numpy as np

__all__ = ["IMB_TYPES", "bincount", "check_imb_factor", "check_index", "check_positive_int", "long_tail_counts"]

#: Long-tail profiles: exponential decay, or a step (half the classes at n_max, half at n_min).
IMB_TYPES = ("exp", "step")


def long_tail_counts(n_max: int, num_classes: int, imb_factor: float, imb_type: str = "exp") -> np.ndarray:
    """Per-class image counts of a long-tailed profile (docs/design.md §2), as int64.

    ``exp``: class c keeps ⌊n_max · imb_factor^(c/(C−1))⌋; ``step``: the first ⌊C/2⌋ classes
    keep n_max, the others ⌊n_max · imb_factor⌋. ``imb_factor`` = n_min / n_max ∈ (0, 1].
    Counts are clamped to at least 1 so that no class vanishes; for the published factors
    (≥ 0.01 with n_max ≥ 500) the clamp never triggers and the counts are the reference ones.
    """
    n_max = check_positive_int("n_max", n_max)
    num_classes = check_positive_int("num_classes", num_classes)
    imb_factor = check_imb_factor(imb_factor)
    if imb_type not in IMB_TYPES:
        raise ValueError(f"imb_type must be one of {IMB_TYPES}, got {imb_type!r}")
    if imb_type == "exp":
        if num_classes == 1:
            counts = [n_max]
        else:
            # Same float expression as the reference code, so the floors agree bit for bit.
            counts = [int(n_max * imb_factor ** (c / (num_classes - 1.0))) for c in range(num_classes)]
    else:
        half = num_classes // 2
        counts = [n_max] * half + [int(n_max * imb_factor)] * (num_classes - half)
    return np.maximum(np.asarray(counts, dtype=np.int64), 1)


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_index(i, n: int, where: str) -> int:
    """``i`` as an index into ``n`` items (negative counts from the end), or TypeError / IndexError
    naming ``where``, e.g. "/data/train.txt with 900 entries"."""
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
        raise TypeError(f"index must be an integer, got {type(i).__name__}")
    if not -n <= i < n:
        raise IndexError(f"index {i} out of range for {where}")
    return int(i) % n


def check_imb_factor(imb_factor) -> float:
    try:
        f = float(imb_factor)
    except (TypeError, ValueError):
        raise ValueError(f"imb_factor must be a number in (0, 1], got {imb_factor!r}") from None
    if f > 1.0:
        raise ValueError(
            f"imb_factor is the ratio n_min/n_max and must be in (0, 1], got {imb_factor!r}; "
            f"for an imbalance factor (IF) of {imb_factor:g} pass imb_factor={1.0 / f:g}"
        )
    if not f > 0.0:  # also rejects nan
        raise ValueError(f"imb_factor must be in (0, 1] (n_min/n_max), got {imb_factor!r}")
    return f


def bincount(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(labels, minlength=num_classes).astype(np.int64, copy=False)
