"""DALI operators for the augmentation stages of ``augment_stages`` (docs/design.md §1 "Views":
timm's RandAugment on the classification view, the reference's CIFAR10Policy, and PIL's
GaussianBlur on the CIFAR sim views), written to give PIL's pixels.

Every stage's op and arguments come per sample from the keyed source; :func:`apply_stages`
dispatches on the stage kind with DALI conditionals, so each op only runs on the samples that
drew it. Must be called inside ``@pipeline_def(enable_conditionals=True)``; input and output
are uint8 HWC images of one size. Only device-agnostic operators are used (arithmetic, slices,
reductions, ``warp_perspective``, ``equalize``): on the GPU the per-sample numbers stay host
tensors, which DALI's arithmetic copies over. That path is not run without a GPU.

How each op meets PIL (tolerances asserted in ``tests/test_augment_parity.py``, on decoded
JPEGs; grey levels):

- point ops (Invert, Solarize, SolarizeAdd, Posterize): integer arithmetic: identical;
- Brightness, Color, Contrast, Sharpness: PIL's blend ``deg + f·(img − deg)`` with a float32
  factor, truncated, and PIL's degenerate images (ITU-R 601 luma in PIL's 16-bit fixed point;
  the mean luma rounded as ``ImageStat`` does; the SMOOTH 3×3 filter, border pixels kept):
  identical in every case measured;
- AutoContrast: per-channel min/max and PIL's float64 LUT formula: identical;
- Equalize: DALI has no histogram or per-sample gather on the CPU (with dense 256-level
  comparisons an exact version cost ~80 ms per 224² image there) and its ``fn.equalize`` is
  OpenCV's rule, 2–5 levels from PIL's on average; :func:`_equalize` recovers PIL's LUT from
  ``fn.equalize`` of the mirrored image: |Δ| ≤ 1 (about a third of the pixels one level off);
- affine ops: ``warp_perspective`` in PIL's pixel-centre convention on float pixels, edges
  replicated, points outside the input filled (decided in float64 by PIL's expression),
  truncated like PIL. Bilinear: |Δ| ≤ 1 (float32 against PIL's double at the truncation, a
  few % of the pixels). Nearest: identical for translations; rotations differ on ~0.1 % of
  the pixels, where PIL's 16.16 fixed point picks the neighbour. Bicubic: DALI's own cubic is
  OpenCV's (a = −0.75), PIL's transform uses a = −1 (mean |Δ| ≈ 0.3, max ≈ 20 near sharp edges
  of photographs), so :func:`_pil_bicubic` builds PIL's from 16 nearest-neighbour gathers and
  float64 weights: identical in every case measured (|Δ| ≤ 1 allowed, see there);
- Gaussian blur: PIL's own algorithm — three passes of its extended box filter (fixed-point
  weights computed by the source, ``dali_sources.pil_blur_taps``) horizontally, then three
  vertically, edges repeated, rounded between passes, in integer arithmetic: identical.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from nvidia.dali import fn, math as dmath, types
from nvidia.dali.pipeline import do_not_convert

from . import augment_stages as st

__all__ = ["apply_stages", "colour_jitter", "pil_gaussian_blur"]

@do_not_convert
def _to_u8(v):
    """PIL's float -> uint8: truncate, clip to [0, 255] (``fn.cast`` saturates).

    DALI does not fuse arithmetic: every operator below is one pass over the image, so the
    ops are written with as few of them as PIL's formulas allow."""
    return fn.cast(dmath.floor(v), dtype=types.UINT8)


@do_not_convert
def _int(img):
    return fn.cast(img, dtype=types.INT32)


@do_not_convert
def _point(img, p):
    x = _int(img)
    t, add, inv, keep = (fn.cast(p[i], dtype=types.INT32) for i in range(4))
    low = dmath.min(x + add, 255)
    high = x + inv * (255 - 2 * x)
    return fn.cast((high + (x < t) * (low - high)) & keep, dtype=types.UINT8)


@do_not_convert
def _on_device_of(img, node):
    """``node`` (computed from host-side per-sample parameters and constants) on ``img``'s device:
    DALI's arithmetic takes whole tensors from one device only."""
    return node.gpu() if getattr(img, "device", "cpu") == "gpu" else node


@do_not_convert
def _warp(img, matrix, interp, border: str, fill=None):
    kw = {} if fill is None else {"fill_value": [float(f) for f in fill]}
    return fn.experimental.warp_perspective(img, matrix=matrix, interp_type=interp, border_mode=border, **kw)


@do_not_convert
def _inside(p, size: int):
    """1 where the output pixel centre maps into the input, uint8 (size, size, 1): PIL's test
    ``0 <= x < w`` on the float64 point ``(a·x + b·y) + c`` of its ``affine_transform``, in the
    same order (the x and y terms are a row and a column, broadcast in one pass)."""
    centre = np.arange(size, dtype=np.float64) + 0.5
    x = types.Constant(centre.reshape(1, size, 1))
    y = types.Constant(centre.reshape(size, 1, 1))
    sx = (p[0] * x + p[1] * y) + p[2]
    sy = (p[3] * x + p[4] * y) + p[5]
    return fn.cast((sx >= 0.0) & (sx < float(size)) & (sy >= 0.0) & (sy < float(size)), dtype=types.UINT8)


@do_not_convert
def _cubic(v1, v2, v3, v4, d):
    """PIL's ``BICUBIC`` macro (cubic convolution with a = −1), in its order of operations."""
    p2 = v3 - v1
    p3 = 2 * (v1 - v2) + v3 - v4
    p4 = v2 - v1 - v3 + v4
    return v2 + d * (p2 + d * (p3 + d * p4))


#: How far past PIL's tap the nearest-neighbour gathers of :func:`_pil_bicubic` aim: DALI's NN
#: warp takes the pixel nearest to the point (ties to even), so a point aimed exactly between
#: two pixels — every pixel centre of an axis the matrix leaves alone — could go either way.
_TAP_AIM = 1e-3


@do_not_convert
def _pil_bicubic(img, p, size: int):
    """PIL's bicubic ``transform`` filter (``bicubic_filter32RGB``: cubic convolution a = −1 on
    the 16 taps around each point, edges clamped) at the affine points of ``p``, before the fill.

    The taps are gathered by nearest-neighbour warps of the matrix shifted by whole pixels,
    aimed :data:`_TAP_AIM` past the tap (base ⌊x − ½ + aim⌋); the weights are the float64
    fractions against that base, as PIL's. Where x − ½ lies within the aim below a whole pixel
    the base is the next pixel with a fraction of about −0.001: the cubic is continuous there,
    so the value moves by ~0.001 of the local gradient (at most one level after truncation)."""
    centre = np.arange(size, dtype=np.float64) + 0.5
    x = types.Constant(centre.reshape(1, size, 1))
    y = types.Constant(centre.reshape(size, 1, 1))
    zx = (p[0] * x + p[1] * y) + p[2] - 0.5
    zy = (p[3] * x + p[4] * y) + p[5] - 0.5
    dx, dy = (_on_device_of(img, z - dmath.floor(z + _TAP_AIM)) for z in (zx, zy))
    src = fn.cast(img, dtype=types.FLOAT)
    rows = []
    for j in (-1, 0, 1, 2):
        taps = []
        for i in (-1, 0, 1, 2):
            aim = types.Constant(np.array([0, 0, i - 0.5 + _TAP_AIM, 0, 0, j - 0.5 + _TAP_AIM, 0, 0, 0], np.float64))
            matrix = fn.cast(fn.reshape(p + aim, shape=[3, 3]), dtype=types.FLOAT)
            taps.append(_warp(src, matrix, types.INTERP_NN, "replicate"))
        rows.append(_cubic(*taps, dx))
    return _cubic(*rows, dy)


def _affine(img, interp, p, fill, size: int):
    matrix = fn.cast(fn.reshape(p, shape=[3, 3]), dtype=types.FLOAT)
    if interp == st.INTERP_NEAREST:
        out = _warp(img, matrix, types.INTERP_NN, "constant", fill)
    else:
        # Resample with the edge replicated (PIL clamps the taps of a point inside the image),
        # then fill where the point itself falls outside, decided exactly as PIL does.
        if interp == st.INTERP_BICUBIC:
            v = _pil_bicubic(img, p, size)
        else:
            # float64 like the bicubic branch (the conditional merges one type); same values.
            v = _f64(_warp(fn.cast(img, dtype=types.FLOAT), matrix, types.INTERP_LINEAR, "replicate"))
        inside = _on_device_of(img, _inside(p, size))
        colour = types.Constant(np.asarray(fill, np.float32))
        out = _to_u8(v * inside + colour * (1 - inside))
    return out


@do_not_convert
def _blend(degenerate, img, factor):
    """PIL's ``Image.blend(degenerate, img, factor)``: deg + factor·(img − deg) with a float32
    factor and float32 arithmetic, as PIL's C code, truncated. ``degenerate`` None is black."""
    factor = fn.cast(factor, dtype=types.FLOAT)
    if degenerate is None:
        return _to_u8(factor * img)
    return _to_u8(degenerate + factor * (img - degenerate))


@do_not_convert
def _luma(x):
    """PIL's RGB -> L: (19595 R + 38470 G + 7471 B + 2^15) >> 16, as int32 (H, W, 1)."""
    return (x[:, :, 0:1] * 19595 + x[:, :, 1:2] * 38470 + x[:, :, 2:3] * 7471 + 32768) // 65536


@do_not_convert
def _contrast_degenerate(x):
    luma = _luma(x)
    total = fn.cast(fn.reductions.sum(luma, dtype=types.INT64), dtype=types.FLOAT64)
    count = fn.cast(luma.shape(dtype=types.INT64)[0] * luma.shape(dtype=types.INT64)[1],
                    dtype=types.FLOAT64)
    return fn.cast(dmath.floor(total / count + 0.5), dtype=types.INT32)


@do_not_convert
def _sharpness_degenerate(x):
    """PIL's ``ImageFilter.SMOOTH`` (3×3, centre 5, others 1, /13) of int32 ``x``: inner pixels
    get round(S / 13) — PIL's float sum can never sit near .5 because S / 13 has a fraction
    k/13 — and the 1-pixel border is left as is, as PIL's 3×3 filter does."""
    core = None
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            tap = x[dy:dy - 2 if dy < 2 else None, dx:dx - 2 if dx < 2 else None, :]
            tap = tap * 5 if (dy, dx) == (1, 1) else tap
            core = tap if core is None else core + tap
    change = (2 * core + 13) // 26 - x[1:-1, 1:-1, :]
    return x + fn.slice(change, start=[-1, -1], shape=x.shape(dtype=types.INT32)[0:2], axes=[0, 1],
                        out_of_bounds_policy="pad", fill_values=0)


@do_not_convert
def _autocontrast(img):
    """PIL's ``ImageOps.autocontrast``: per channel ⌊i·scale + offset⌋ in float64 with
    scale = 255/(hi − lo), offset = −lo·scale; a channel of one grey level stays as it is
    (scale 1, offset 0, folded into the (3,) coefficients)."""
    lo = fn.cast(fn.reductions.min(img, axes=[0, 1]), dtype=types.FLOAT64)
    hi = fn.cast(fn.reductions.max(img, axes=[0, 1]), dtype=types.FLOAT64)
    flat = hi <= lo
    scale = 255.0 / dmath.max(hi - lo, 1.0)
    scale = scale + flat * (1.0 - scale)
    offset = (flat == 0) * (-lo * scale)
    return _to_u8(img * scale + offset)


@do_not_convert
def _equalize(img):
    """PIL's ``ImageOps.equalize`` per channel, to |Δ| ≤ 1.

    PIL maps level i to ⌊(c + s//2) / s⌋ (at most 255), with c the count of pixels below i,
    N' the count below the top level and s = N' // 255 (s = 0 or a single level: unchanged).
    DALI's ``fn.equalize`` (OpenCV's rule) on the mirrored image 255 − x returns
    255 − round(255·(N' − c)/N'), i.e. c ≈ v·N'/255 within ±N'/510 ≈ ±s/2 for the returned v;
    PIL's formula on that c is one level off where c sat within s/2 of a step."""
    white = types.Constant(255, dtype=types.UINT8)
    v = white - fn.equalize(white - img)
    hi = fn.reductions.max(img, axes=[0, 1])
    lo = fn.reductions.min(img, axes=[0, 1])
    top = fn.reductions.sum(fn.cast(img == hi, dtype=types.UINT8), axes=[0, 1])
    shape = img.shape(dtype=types.INT64)
    below = shape[0] * shape[1] - fn.cast(top, dtype=types.INT64)
    step = below // 255
    keep = (step == 0) | (hi == lo)
    # Per channel (3,): out = ⌊v·gain + bias⌋, or x where PIL leaves the channel unchanged.
    divisor = fn.cast(dmath.max(step, 1), dtype=types.FLOAT64)
    gain = (keep == 0) * fn.cast(below, dtype=types.FLOAT64) / (255.0 * divisor)
    bias = (keep == 0) * fn.cast(step // 2, dtype=types.FLOAT64) / divisor
    return _to_u8(v * gain + (img * keep + bias))


def _stage(img, kind, interp, p, fill, size):
    if kind == st.KIND_AFFINE:
        img = _affine(img, interp, p, fill, size)
    elif kind == st.KIND_POINT:
        img = _point(img, p)
    elif kind == st.KIND_BRIGHTNESS:
        img = _blend(None, img, p[0])
    elif kind == st.KIND_COLOR:
        img = _blend(_luma(_int(img)), img, p[0])
    elif kind == st.KIND_CONTRAST:
        img = _blend(_contrast_degenerate(_int(img)), img, p[0])
    elif kind == st.KIND_SHARPNESS:
        img = _blend(_sharpness_degenerate(_int(img)), img, p[0])
    elif kind == st.KIND_AUTOCONTRAST:
        img = _autocontrast(img)
    elif kind == st.KIND_EQUALIZE:
        img = _equalize(img)
    return img


def apply_stages(img, kinds, interps, params, *, stages: int, fill: Sequence[int], size: int):
    """Apply ``stages`` keyed stages (kinds (S,), interps (S,), params (S, NUM_PARAMS) float64
    per sample, from the source) in order to size × size images; ``fill`` is the geometric fill
    colour (0–255 per channel)."""
    for s in range(stages):
        img = _stage(img, kinds[s], interps[s], params[s], fill, size)
    return img


@do_not_convert
def _shifted(x, d: int, axis: int):
    """``x`` moved by ``d`` pixels along ``axis`` with the edge repeated: out[i] = x[clamp(i + d)]."""
    sl = [slice(None)] * 3

    def part(a, b):
        sl[axis] = slice(a, b)
        return x[tuple(sl)]

    if d > 0:
        return fn.cat(part(d, None), *([part(-1, None)] * d), axis=axis)
    return fn.cat(*([part(0, 1)] * -d), part(0, d), axis=axis)


@do_not_convert
def _box_pass(x, taps, axis: int):
    """One pass of PIL's extended box filter: Σ_d taps[d]·x[i + d] in 2^-24 fixed point, rounded
    half up (``(acc + 2^23) >> 24``), taps for d = −2 … 2, edges repeated."""
    acc = taps[2] * x
    for d in (-2, -1, 1, 2):
        acc = acc + taps[d + 2] * _shifted(x, d, axis)
    return (acc + (1 << 23)) // (1 << 24)


def pil_gaussian_blur(img, taps):
    """PIL's ``GaussianBlur``: ``taps`` (5,) int64 per sample is one pass of PIL's extended box
    filter in 2^-24 units (all zero: no blur; ``dali_sources.pil_blur_taps``); three horizontal
    passes, then three vertical, in exact integer arithmetic as PIL's ``BoxBlur.c``."""
    if taps[2] > 0:
        x = fn.cast(img, dtype=types.INT64)
        for axis in (1, 1, 1, 0, 0, 0):
            x = _box_pass(x, taps, axis)
        img = fn.cast(x, dtype=types.UINT8)
    return img


@do_not_convert
def _f32(v):
    return fn.cast(v, dtype=types.FLOAT)


@do_not_convert
def _f64(v):
    return fn.cast(v, dtype=types.FLOAT64)


@do_not_convert
def _pil_hue(img, shift):
    """torchvision's PIL ``adjust_hue``: PIL's RGB -> HSV (8-bit H, S, V), ``shift`` added to H
    mod 256, PIL's HSV -> RGB, with PIL's arithmetic (``Convert.c``: float32 where it stores
    floats, double where its expressions are double, truncation and round-half-up as there)."""
    x = _int(img)
    r, g, b = x[:, :, 0:1], x[:, :, 1:2], x[:, :, 2:3]
    maxc = dmath.max(r, dmath.max(g, b))
    minc = dmath.min(r, dmath.min(g, b))
    # rgb2hsv: grey pixels get H = S = 0; the max(…, 1) only keeps their (unused) quotients finite.
    cr = _f32(dmath.max(maxc - minc, 1))
    s = cr / _f32(dmath.max(maxc, 1))
    rc, gc, bc = (_f32(maxc - c) / cr for c in (r, g, b))
    is_r = fn.cast(r == maxc, dtype=types.FLOAT)
    is_g = fn.cast((g == maxc) & (r != maxc), dtype=types.FLOAT)
    is_b = 1.0 - is_r - is_g
    h = is_r * (bc - gc) + is_g * _f32((2.0 + _f64(rc)) - _f64(bc)) + is_b * _f32((4.0 + _f64(gc)) - _f64(rc))
    t = _f64(h) / 6.0 + 1.0
    h = _f32(t - _f64(t >= 1.0))  # fmod(t, 1) for t in [5/6, 11/6], stored as float
    colour = fn.cast(maxc != minc, dtype=types.INT32)
    uh = colour * fn.cast(dmath.floor(_f64(h) * 255.0), dtype=types.INT32)
    us = colour * fn.cast(dmath.floor(_f64(s) * 255.0), dtype=types.INT32)
    hue = (uh + fn.cast(shift, dtype=types.INT32)) & 255
    # hsv2rgb (S = 0 needs no branch: p = q = t = V then).
    hf = _f64(hue) * 6.0 / 255.0
    i = dmath.floor(hf)
    f = _f32(hf - i)
    fs = _f32(_f64(us) / 255.0)
    v = _f64(maxc)
    p = fn.cast(dmath.floor(v * (1.0 - _f64(fs)) + 0.5), dtype=types.INT32)
    q = fn.cast(dmath.floor(v * (1.0 - _f64(fs * f)) + 0.5), dtype=types.INT32)
    t = fn.cast(dmath.floor(v * (1.0 - _f64(fs) * (1.0 - _f64(f))) + 0.5), dtype=types.INT32)
    k = fn.cast(i, dtype=types.INT32)
    k = k - 6 * fn.cast(k == 6, dtype=types.INT32)
    sel = [fn.cast(k == n, dtype=types.INT32) for n in range(6)]
    vi = maxc
    red = vi * (sel[0] + sel[5]) + q * sel[1] + p * (sel[2] + sel[3]) + t * sel[4]
    green = t * sel[0] + vi * (sel[1] + sel[2]) + q * sel[3] + p * (sel[4] + sel[5])
    blue = p * (sel[0] + sel[1]) + t * sel[2] + vi * (sel[3] + sel[4]) + q * sel[5]
    return fn.cast(fn.cat(red, green, blue, axis=2), dtype=types.UINT8)


@do_not_convert
def _grayscale(img):
    """torchvision's PIL ``rgb_to_grayscale(num_output_channels=3)``: PIL's L in every channel."""
    luma = _luma(_int(img))
    return fn.cast(fn.cat(luma, luma, luma, axis=2), dtype=types.UINT8)


def colour_jitter(img, jitter):
    """torchvision's ``ColorJitter`` on PIL images at the drawn parameters, then ``RandomGrayscale``.

    ``jitter`` float64 (9,) per sample (``view_draw.ViewParams.jitter_array``): the four steps in
    the order drawn (0 brightness, 1 contrast, 2 saturation, 3 hue, 4 none), the brightness,
    contrast and saturation factors, the hue shift, the grayscale flag. The steps are PIL's
    ``ImageEnhance`` Brightness, Contrast (the blend with the image's mean grey) and Color, and
    the HSV hue rotation of :func:`_pil_hue`; each runs only on the samples that drew it."""
    for k in range(4):
        step = fn.cast(jitter[k], dtype=types.INT32)
        if step == 0:
            img = _blend(None, img, jitter[4])
        elif step == 1:
            img = _blend(_contrast_degenerate(_int(img)), img, jitter[5])
        elif step == 2:
            img = _blend(_luma(_int(img)), img, jitter[6])
        elif step == 3:
            img = _pil_hue(img, jitter[7])
    if jitter[8] > 0.5:
        img = _grayscale(img)
    return img
