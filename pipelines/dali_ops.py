"""DALI graph helpers shared by the training and validation pipelines (ARCHITECTURE §1
"Views", §3 pipeline contract): decode, crop-and-resize, flip, colour, blur, RandAugment /
AutoAugment with externally drawn (keyed) choices, and normalisation to NCHW float.

Every helper takes its random parameters as per-sample tensors drawn by the keyed sources
(``dali_sources``), never from DALI's own random operators; that is what keeps the graph
deterministic under rebuilds and resume. The functions must be called inside a
``@pipeline_def(enable_conditionals=True)`` function: the blur and the augmentation choice
use DALI conditionals.

Where data lives: with ``device="gpu"`` the decoder runs as ``mixed`` (nvJPEG; the bytes
come from the host sources and the decoded images land on the GPU) and every image
operator after it runs on the GPU; the per-sample parameters stay host tensors (DALI
argument inputs are always on the CPU). That is the only difference from ``device="cpu"``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali.auto_aug import augmentations as _aug
from nvidia.dali.auto_aug.auto_augment import get_reduced_cifar10_policy
from nvidia.dali.auto_aug.core import select, signed_bin
from nvidia.dali.auto_aug.rand_augment import get_rand_augment_suite

from .dali_sources import AugmentTables

__all__ = ["AUG_FILL", "augment_tables", "colour", "crop_resize", "decode", "keyed_augment", "normalize",
           "translate_px"]

#: Fill of the geometric augmentations (DALI auto_aug's default; torch backend uses the same).
AUG_FILL = 128
RA_N, RA_M, RA_BINS = 2, 10, 31


def translate_px(size: int) -> int:
    """Largest RandAugment/AutoAugment shift: 150/331 of the image side, as torchvision."""
    return max(1, int(round(size * 150 / 331)))


def augment_tables(recipe: str, size: int, enabled: bool):
    """(AugmentTables for the sources, per-stage lists of DALI augmentations, number of bins).

    imagenet: RandAugment n=2 m=10 over DALI's RandAugment suite; cifar: the CIFAR-10
    AutoAugment policy (DALI's reduced-CIFAR-10 policy, the paper's 25 sub-policies)."""
    if not enabled:
        return AugmentTables("none"), [], 0
    if recipe == "imagenet":
        suite = get_rand_augment_suite(use_shape=False, max_translate_abs=translate_px(size))
        return AugmentTables("rand", n=RA_N, m=RA_M, num_ops=len(suite)), [suite] * RA_N, RA_BINS
    policy = get_reduced_cifar10_policy(use_shape=False, max_translate_abs=translate_px(size))
    subs = policy.sub_policies
    n_stages = max(len(sp) for sp in subs)
    # Per stage: the distinct augmentations used there, plus identity for "stage does not run".
    stage_augs = []
    for s in range(n_stages):
        seen = []
        for sp in subs:
            if s < len(sp) and sp[s][0] not in seen:
                seen.append(sp[s][0])
        stage_augs.append(seen + [_aug.identity])
    identity = np.array([len(a) - 1 for a in stage_augs], np.int32)
    ops = np.tile(identity, (len(subs), 1))
    prob = np.zeros((len(subs), n_stages), np.float64)
    mag = np.zeros((len(subs), n_stages), np.int32)
    for r, sp in enumerate(subs):
        for s, (aug, p, m) in enumerate(sp):
            ops[r, s] = stage_augs[s].index(aug)
            prob[r, s] = p
            mag[r, s] = 0 if m is None else m
    tables = AugmentTables("auto", aa_ops=ops, aa_prob=prob, aa_mag=mag, aa_identity=identity)
    return tables, stage_augs, policy.num_magnitude_bins


def decode(data, recipe: str, device: str):
    """Encoded bytes -> HWC uint8 RGB. ``mixed`` = nvJPEG on the GPU; arrays (CIFAR) are already
    decoded and only move to the GPU."""
    if recipe == "cifar":
        return data.gpu() if device == "gpu" else data  # host -> GPU copy here in GPU mode
    return fn.decoders.image(data, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)


def crop_resize(img, window, size: int):
    """Resize the window (y0, x0, y1, x1) of ``img`` to size × size (bilinear, antialiased):
    RandomResizedCrop's crop, resize and — where x0 > x1 — horizontal flip in one pass."""
    return fn.resize(img, size=[size, size], roi_start=window[0:2], roi_end=window[2:4], roi_relative=False,
                     antialias=True, interp_type=types.INTERP_LINEAR)


def pad_crop(img, window, size: int):
    """RandomCrop(size, padding 4): the window may start at a negative offset; outside is zero."""
    return fn.slice(img, start=fn.cast(window[0:2], dtype=types.INT32), shape=[size, size], axis_names="HW",
                    out_of_bounds_policy="pad", fill_values=0)


def resize_full(img, size: int):
    return fn.resize(img, size=[size, size], antialias=True, interp_type=types.INTERP_LINEAR)


def colour(img, params):
    """Brightness, contrast, saturation factors and hue shift (degrees) in one colour twist;
    identity parameters (1, 1, 1, 0) leave the image as it is."""
    return fn.color_twist(img, brightness=params[0], contrast=params[1], saturation=params[2], hue=params[3])


def flip(img, flag):
    return fn.flip(img, horizontal=flag)


def blur(img, sigma):
    """Gaussian blur 3×3 with σ > 0, nothing where σ = 0 (the p = 0.5 coin was drawn by the source)."""
    if sigma > 0.0:
        img = fn.gaussian_blur(img, sigma=sigma, window_size=3)
    return img


def keyed_augment(img, stage_augs: Sequence[Sequence], num_bins: int, ops, mags, signs):
    """RandAugment / AutoAugment with the op, magnitude bin and sign of every stage given per
    sample (drawn by the source), applied with DALI's augmentation suite via ``select``.

    Geometric ops sample with nearest-neighbour interpolation, torchvision's default for
    RandAugment/AutoAugment (and the torch backend's); on DALI's CPU operators it is also
    about 5× cheaper than bilinear warping."""
    for s, augs in enumerate(stage_augs):
        bin_ = signed_bin(mags[s], random_sign=signs[s])
        img = select(augs, ops[s], data=img, magnitude_bin=bin_, num_magnitude_bins=num_bins, fill_value=AUG_FILL,
                     interp_type=types.INTERP_NN)
    return img


def normalize(img, mean: Sequence[float], std: Sequence[float], layout: str = "CHW", half: bool = False):
    """uint8 HWC -> (x/255 − mean)/std as float32 (float16 with ``half``), CHW or HWC."""
    return fn.crop_mirror_normalize(img, dtype=types.FLOAT16 if half else types.FLOAT, output_layout=layout,
                                    mean=[255.0 * m for m in mean], std=[255.0 * s for s in std])
