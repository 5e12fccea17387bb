"""CutMix boxes and area labels (ARCHITECTURE §1, "CutMix").

Pure functions first (as in timm's mixup): :func:`sample_box` draws λ0 ~ Beta(α, α), a cut
ratio r = √(1 − λ0) and a box of size (⌊H·r⌋, ⌊W·r⌋) centred uniformly and clipped to the
image; :func:`area_lambda` gives λ = 1 − (clipped box area)/(H·W), the weight of the
background class. λ is always recomputed from the clipped box, never taken from λ0.
:func:`cutmix` pastes a box of the foreground into the background for the torch path and
:func:`cutmix_batch` applies it per batch (the reference behaviour) or per sample.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["Box", "CutMixResult", "area_lambda", "cutmix", "cutmix_batch", "sample_box"]


class Box(NamedTuple):
    """A half-open pixel box [y0, y1) × [x0, x1)."""

    y0: int
    x0: int
    y1: int
    x1: int


class CutMixResult(NamedTuple):
    mixed: Tensor     # (B, C, H, W) classification input
    lam: Tensor       # (B,) float32, weight of the background label (1.0 where not mixed)
    applied: Tensor   # (B,) bool, whether a box was pasted into this sample


def _rng(generator) -> np.random.Generator:
    if generator is None:
        return np.random.default_rng()
    if isinstance(generator, np.random.Generator):
        return generator
    raise ValueError(f"generator must be a numpy.random.Generator or None; got {type(generator).__name__}. "
                     "Create one with numpy.random.default_rng(seed).")


def sample_box(h: int, w: int, alpha: float = 1.0, generator: np.random.Generator | None = None) -> Box:
    """Draw a CutMix box for an h × w image: λ0 ~ Beta(α, α), r = √(1 − λ0), centre uniform, clipped."""
    if h < 1 or w < 1:
        raise ValueError(f"sample_box: image size must be positive; got h={h}, w={w}")
    if not alpha > 0:
        raise ValueError(f"sample_box: alpha must be > 0; got {alpha!r}")
    rng = _rng(generator)
    lam0 = rng.beta(alpha, alpha)
    r = np.sqrt(1.0 - lam0)
    cut_h, cut_w = int(h * r), int(w * r)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0 = int(np.clip(cy - cut_h // 2, 0, h))
    x0 = int(np.clip(cx - cut_w // 2, 0, w))
    y1 = int(np.clip(cy - cut_h // 2 + cut_h, 0, h))
    x1 = int(np.clip(cx - cut_w // 2 + cut_w, 0, w))
    return Box(y0, x0, y1, x1)


def area_lambda(box, h: int, w: int) -> float:
    """λ = 1 − (box area)/(h·w): the share of the image that still shows the background."""
    y0, x0, y1, x1 = box
    if not (0 <= y0 <= y1 <= h and 0 <= x0 <= x1 <= w):
        raise ValueError(f"area_lambda: box {tuple(box)} is not inside a {h}×{w} image; clip it first")
    return 1.0 - ((y1 - y0) * (x1 - x0)) / float(h * w)


def cutmix(background: Tensor, foreground: Tensor, box) -> Tensor:
    """Copy of ``background`` (…, H, W) with ``box`` replaced by the same region of ``foreground``."""
    if background.shape != foreground.shape:
        raise ValueError(f"cutmix: background {tuple(background.shape)} and foreground "
                         f"{tuple(foreground.shape)} must have the same shape")
    y0, x0, y1, x1 = box
    h, w = background.shape[-2:]
    area_lambda(box, h, w)  # validates the box
    out = background.clone()
    out[..., y0:y1, x0:x1] = foreground[..., y0:y1, x0:x1]
    return out


def cutmix_batch(background: Tensor, foreground: Tensor, prob: float = 0.5, *, per_sample: bool = False,
                 alpha: float = 1.0, generator: np.random.Generator | None = None) -> CutMixResult:
    """CutMix a batch (B, C, H, W): per batch (one coin and one box for all, the reference
    implementation's behaviour) or per sample (a coin and a box each)."""
    if background.dim() != 4 or background.shape != foreground.shape:
        raise ValueError(f"cutmix_batch: expected two (B, C, H, W) batches of one shape; got "
                         f"{tuple(background.shape)} and {tuple(foreground.shape)}")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"cutmix_batch: prob must be in [0, 1]; got {prob!r}")
    rng = _rng(generator)
    b, _, h, w = background.shape
    lam = torch.ones(b, dtype=torch.float32)
    applied = torch.zeros(b, dtype=torch.bool)
    if not per_sample:
        if rng.random() >= prob:
            return CutMixResult(background, lam.to(background.device), applied.to(background.device))
        box = sample_box(h, w, alpha, rng)
        lam.fill_(area_lambda(box, h, w))
        applied.fill_(True)
        return CutMixResult(cutmix(background, foreground, box), lam.to(background.device),
                            applied.to(background.device))
    mixed = background.clone()
    for i in range(b):
        if rng.random() < prob:
            box = sample_box(h, w, alpha, rng)
            y0, x0, y1, x1 = box
            mixed[i, :, y0:y1, x0:x1] = foreground[i, :, y0:y1, x0:x1]
            lam[i] = area_lambda(box, h, w)
            applied[i] = True
    return CutMixResult(mixed, lam.to(background.device), applied.to(background.device))
