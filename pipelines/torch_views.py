"""The torch backend's executor of the keyed view draw (``view_draw``): it applies the drawn
parameters with the reference's own functions — torchvision's PIL crop / resize / flip and the
PIL kernels of ``ColorJitter`` and ``RandomGrayscale``, timm's RandAugment op functions at the
drawn magnitude, sign and interpolation, the reference's CIFAR10Policy ops, PIL's
GaussianBlur — so the torch views are the reference's pipeline with its random numbers
replaced by the keyed draw the DALI graph consumes too.
"""
from __future__ import annotations

import random
from typing import Sequence

import numpy as np

from .cifar_policy import pil_op
from .randaugment import SIGNED_OPS, TRANSLATE_PCT
from .view_draw import BRIGHTNESS, CONTRAST, HUE, SATURATION, AugmentTables, ViewParams

__all__ = ["apply_view", "timm_op"]


def timm_op(img, name: str, magnitude: float, negate: bool, bicubic: bool, fill: Sequence[int]):
    """timm's RandAugment op ``name`` (its ``LEVEL_TO_ARG`` mapping and ``NAME_TO_OP`` function, as
    its ``AugmentOp`` calls them) at a drawn magnitude, sign and interpolation."""
    from PIL import Image
    from timm.data.auto_augment import LEVEL_TO_ARG, NAME_TO_OP

    hparams = {"translate_const": int(img.size[0] * TRANSLATE_PCT), "img_mean": tuple(fill)}
    level_fn = LEVEL_TO_ARG[name]
    if level_fn is None:
        args = ()
    elif name in SIGNED_OPS:
        state = random.getstate()  # timm's level function draws its own sign: ours replaces it
        try:
            args = level_fn(magnitude, hparams)
        finally:
            random.setstate(state)
        args = ((-1.0 if negate else 1.0) * abs(args[0]), *args[1:])
    else:
        args = level_fn(magnitude, hparams)
    kwargs = {"fillcolor": tuple(fill), "resample": Image.BICUBIC if bicubic else Image.BILINEAR}
    return NAME_TO_OP[name](img, *args, **kwargs)


def _crop(img, p: ViewParams, size: int):
    """RandomResizedCrop (torchvision on PIL: crop, then PIL's bilinear resize, antialiased when
    shrinking) or the padded RandomCrop, then the flip."""
    from PIL import Image

    y0, x0, y1, x1 = p.window
    if p.pad_crop:
        arr = np.asarray(img)
        h, w = arr.shape[:2]
        out = np.zeros((y1 - y0, x1 - x0, 3), np.uint8)  # the padding is black (RandomCrop's fill 0)
        sy0, sx0, sy1, sx1 = max(y0, 0), max(x0, 0), min(y1, h), min(x1, w)
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = arr[sy0:sy1, sx0:sx1]
        img = Image.fromarray(out)
    else:
        img = img.crop((x0, y0, x1, y1)).resize((size, size), Image.BILINEAR)
    return img.transpose(Image.FLIP_LEFT_RIGHT) if p.flip else img


def _jitter(img, p: ViewParams):
    """torchvision's ColorJitter at the drawn order and factors, then RandomGrayscale."""
    from torchvision.transforms import functional as F

    b, c, s, h = p.factors
    for step in p.steps:
        if step == BRIGHTNESS:
            img = F.adjust_brightness(img, b)
        elif step == CONTRAST:
            img = F.adjust_contrast(img, c)
        elif step == SATURATION:
            img = F.adjust_saturation(img, s)
        elif step == HUE:
            img = F.adjust_hue(img, h)
    if p.gray:
        img = F.rgb_to_grayscale(img, num_output_channels=3)
    return img


def apply_view(img, p: ViewParams, size: int, *, tables: AugmentTables | None = None, choices=None,
               fill: Sequence[int] = (128, 128, 128), augment: bool = True):
    """One view of the RGB PIL image ``img`` (already brought to size × size by the loader under
    the CIFAR recipe) as an RGB PIL image: crop-resize-flip, jitter, grayscale, blur and, for the
    classification view, the automatic augmentation ``choices`` of ``tables``."""
    from PIL import Image, ImageFilter

    if not augment:
        return img.resize((size, size), Image.BILINEAR)
    img = _jitter(_crop(img, p, size), p)
    if p.blur > 0:
        img = img.filter(ImageFilter.GaussianBlur(radius=p.blur))
    if tables is not None and choices is not None:
        for op in tables.ops(choices):
            if op[0] == "rand":
                img = timm_op(img, *op[1:], fill)
            else:
                img = pil_op(img, *op[1:])
    return img
