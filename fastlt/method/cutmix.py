"""CutMix boxes and area labels (docs/design.md §1, "CutMix"): the one definition both pipeline
backends use.

Pure functions: :func:`sample_box` is the reference's ``rand_bbox`` (ConCutMix ``main.py``):
λ0 ~ Beta(α, α), a cut ratio r = √(1 − λ0), half-sides ⌊⌊H·r⌋/2⌋ and ⌊⌊W·r⌋/2⌋ around a
centre drawn uniformly over the pixels, clipped to the image. The unclipped side is therefore
2·⌊⌊S·r⌋/2⌋ — one pixel short of ⌊S·r⌋ when that is odd — which shifts the distribution of
λ (mean area label 0.700 at 32 px against 0.690 for a side of ⌊S·r⌋, Beta(1, 1)).
:func:`area_lambda` gives λ = 1 − (clipped box area)/(H·W), the weight of the background
class. λ is always recomputed from the clipped box, never taken from λ0. Which samples of a
step are mixed, and with which box, is decided by ``fastlt.pipelines.common.cutmix_boxes``
(one coin and one box per batch, the reference behaviour, or per sample); the torch backend
pastes the box with a slice assignment, the DALI graph with ``fn.multi_paste``.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["Box", "area_lambda", "sample_box"]


class Box(NamedTuple):
    """A half-open pixel box [y0, y1) × [x0, x1)."""

    y0: int
    x0: int
    y1: int
    x1: int


def _rng(generator) -> np.random.Generator:
    if generator is None:
        return np.random.default_rng()
    if isinstance(generator, np.random.Generator):
        return generator
    raise ValueError(f"generator must be a numpy.random.Generator or None; got {type(generator).__name__}. "
                     "Create one with numpy.random.default_rng(seed).")


def sample_box(h: int, w: int, alpha: float = 1.0, generator: np.random.Generator | None = None) -> Box:
    """Draw a CutMix box for an h × w image as the reference's ``rand_bbox`` does: λ0 ~ Beta(α, α),
    r = √(1 − λ0), centre (cy, cx) uniform over the pixels (drawn in that order), box
    [cy − ⌊⌊h·r⌋/2⌋, cy + ⌊⌊h·r⌋/2⌋) × [cx − ⌊⌊w·r⌋/2⌋, cx + ⌊⌊w·r⌋/2⌋) clipped to the image."""
    if h < 1 or w < 1:
        raise ValueError(f"sample_box: image size must be positive; got h={h}, w={w}")
    if not alpha > 0:
        raise ValueError(f"sample_box: alpha must be > 0; got {alpha!r}")
    rng = _rng(generator)
    lam0 = rng.beta(alpha, alpha)
    r = np.sqrt(1.0 - lam0)
    cut_h, cut_w = int(h * r), int(w * r)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    half_h, half_w = cut_h // 2, cut_w // 2  # the reference's cx ± cut_w // 2: an even side
    y0 = int(np.clip(cy - half_h, 0, h))
    x0 = int(np.clip(cx - half_w, 0, w))
    y1 = int(np.clip(cy + half_h, 0, h))
    x1 = int(np.clip(cx + half_w, 0, w))
    return Box(y0, x0, y1, x1)


def area_lambda(box, h: int, w: int) -> float:
    """λ = 1 − (box area)/(h·w): the share of the image that still shows the background."""
    y0, x0, y1, x1 = box
    if not (0 <= y0 <= y1 <= h and 0 <= x0 <= x1 <= w):
        raise ValueError(f"area_lambda: box {tuple(box)} is not inside a {h}×{w} image; clip it first")
    return 1.0 - ((y1 - y0) * (x1 - x0)) / float(h * w)
