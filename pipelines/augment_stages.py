"""One augmentation stage as plain numbers: the vocabulary shared by the keyed DALI sources
(which draw RandAugment and CIFAR10Policy choices, docs/design.md §1 "Views") and the DALI graph
(``dali_augment``), which applies them.

A stage is ``(kind, interp, params)``: ``kind`` one of the ``KIND_*`` codes, ``interp`` one of
the ``INTERP_*`` codes (used by affine stages only), ``params`` :data:`NUM_PARAMS` numbers
(float64, so affine coefficients are PIL's doubles) whose meaning depends on the kind:

- ``KIND_POINT``: (threshold t, add, invert, keep_mask). Each channel value i becomes
  ``min(255, i + add)`` where ``i < t``, else ``255 − i`` if ``invert`` else ``i``; then
  ``& keep_mask``. That one formula is PIL's Invert, Solarize, SolarizeAdd and Posterize.
- ``KIND_AFFINE``: a 3×3 row-major matrix mapping output to input coordinates in PIL's
  convention (pixel (x, y) covers [x, x+1) × [y, y+1), so output pixel centres (x + ½, y + ½)
  are mapped), exactly the ``data`` of PIL's ``Image.transform(..., AFFINE, data)``; input
  points outside the image take the fill colour.
- ``KIND_BRIGHTNESS``, ``KIND_COLOR``, ``KIND_CONTRAST``, ``KIND_SHARPNESS``: (factor,):
  PIL's ``ImageEnhance`` blend of the image with its degenerate (black, grayscale, mean grey,
  smoothed) image.
- ``KIND_AUTOCONTRAST``, ``KIND_EQUALIZE``, ``KIND_NONE``: no parameters.

The constructors below turn PIL-level arguments (degrees, shear factor, pixels, bits, ...)
into stages; nothing here imports DALI, so the sources pickle cheaply into DALI's workers.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["KIND_NONE", "KIND_POINT", "KIND_AFFINE", "KIND_BRIGHTNESS", "KIND_COLOR", "KIND_CONTRAST",
           "KIND_SHARPNESS", "KIND_AUTOCONTRAST", "KIND_EQUALIZE", "INTERP_NEAREST", "INTERP_BILINEAR",
           "INTERP_BICUBIC", "NUM_PARAMS", "Stage", "affine", "autocontrast", "enhance", "equalize", "identity",
           "invert", "posterize", "rotate", "shear_x", "shear_y", "solarize", "solarize_add", "translate",
           "stack_stages"]

(KIND_NONE, KIND_POINT, KIND_AFFINE, KIND_BRIGHTNESS, KIND_COLOR, KIND_CONTRAST, KIND_SHARPNESS,
 KIND_AUTOCONTRAST, KIND_EQUALIZE) = range(9)
INTERP_NEAREST, INTERP_BILINEAR, INTERP_BICUBIC = 0, 1, 2
NUM_PARAMS = 9

Stage = tuple  # (kind: int, interp: int, params: np.ndarray float64 (NUM_PARAMS,))


def _stage(kind: int, interp: int = INTERP_NEAREST, values=()) -> Stage:
    params = np.zeros(NUM_PARAMS, np.float64)
    params[:len(values)] = values
    return kind, interp, params


def identity() -> Stage:
    return _stage(KIND_NONE)


def _point(threshold: int, add: int, invert_high: bool, keep_mask: int) -> Stage:
    return _stage(KIND_POINT, values=(threshold, add, float(invert_high), keep_mask))


def invert() -> Stage:
    """``ImageOps.invert``: every value i becomes 255 − i."""
    return _point(0, 0, True, 255)


def solarize(threshold: float) -> Stage:
    """``ImageOps.solarize(img, threshold)``: values ≥ threshold are inverted. A fractional
    threshold (the CIFAR policy's) is the integer ⌈threshold⌉ for integer pixel values."""
    return _point(int(min(256, max(0, math.ceil(threshold)))), 0, True, 255)


def solarize_add(add: int, threshold: int = 128) -> Stage:
    """timm's ``solarize_add``: values below ``threshold`` get ``add`` (saturating at 255)."""
    return _point(int(threshold), int(add), False, 255)


def posterize(bits: int) -> Stage:
    """``ImageOps.posterize``: keep the ``bits`` most significant bits (8 or more: unchanged)."""
    bits = int(bits)
    keep = 255 if bits >= 8 else (~(2 ** (8 - bits) - 1)) & 255
    return _point(0, 0, False, keep)


def affine(data, interp: int) -> Stage:
    """PIL ``Image.transform(size, AFFINE, data)`` with ``data`` = (a, b, c, d, e, f): output
    pixel centre (x, y) samples the input at (a·x + b·y + c, d·x + e·y + f)."""
    a, b, c, d, e, f = (float(v) for v in data)
    return _stage(KIND_AFFINE, interp, (a, b, c, d, e, f, 0.0, 0.0, 1.0))


def shear_x(factor: float, interp: int) -> Stage:
    return affine((1, factor, 0, 0, 1, 0), interp)


def shear_y(factor: float, interp: int) -> Stage:
    return affine((1, 0, 0, factor, 1, 0), interp)


def translate(dx: float, dy: float, interp: int) -> Stage:
    """Input sampled at (x + dx, y + dy): the content moves by (−dx, −dy), as PIL's translate."""
    return affine((1, 0, dx, 0, 1, dy), interp)


def rotate(degrees: float, width: int, height: int, interp: int) -> Stage:
    """``Image.rotate(degrees)`` (counter-clockwise, about the centre (w/2, h/2), same size):
    the matrix PIL builds, with its cosines and sines rounded to 15 decimals (so multiples of
    90° are exact pixel permutations, as PIL's transpose shortcut)."""
    angle = -math.radians(degrees % 360.0)
    a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
    d, e = round(-math.sin(angle), 15), round(math.cos(angle), 15)
    cx, cy = width / 2.0, height / 2.0
    c = a * -cx + b * -cy + cx
    f = d * -cx + e * -cy + cy
    return affine((a, b, c, d, e, f), interp)


_ENHANCE = {"Brightness": KIND_BRIGHTNESS, "Color": KIND_COLOR, "Contrast": KIND_CONTRAST,
            "Sharpness": KIND_SHARPNESS}


def enhance(name: str, factor: float) -> Stage:
    """``ImageEnhance.<name>(img).enhance(factor)`` for Brightness, Color, Contrast, Sharpness."""
    if name not in _ENHANCE:
        raise ValueError(f"unknown enhance op {name!r}; expected one of {sorted(_ENHANCE)}")
    return _stage(_ENHANCE[name], values=(factor,))


def autocontrast() -> Stage:
    return _stage(KIND_AUTOCONTRAST)


def equalize() -> Stage:
    return _stage(KIND_EQUALIZE)


def stack_stages(stages) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(kinds int32 (S,), interps int32 (S,), params float64 (S, NUM_PARAMS)) of a stage list:
    the three per-sample source outputs the DALI graph reads."""
    kinds = np.array([s[0] for s in stages], np.int32)
    interps = np.array([s[1] for s in stages], np.int32)
    params = np.stack([s[2] for s in stages]) if stages else np.zeros((0, NUM_PARAMS), np.float64)
    return kinds, interps, params
