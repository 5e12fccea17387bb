"""The reference's CIFAR-10 AutoAugment policy for the CIFAR classification view (docs/design.md
§1 "Views": RandomCrop(32, pad 4) + flip + CIFAR10Policy).

The reference (ConCutMix's ``utils.CIFAR10Policy``, after the AutoAugment paper's CIFAR-10
policy) picks one of 25 two-op sub-policies uniformly; each op runs with its own probability
at a fixed index into 10 magnitude bins. Its semantics, which differ from torchvision's and
DALI's versions of the policy:

- shear ±(0–0.3), bicubic; translate ±(0–150/331 of the side), nearest; rotate +(0–30°)
  counter-clockwise only (the reference draws no sign for rotate), nearest;
- Color, Contrast, Sharpness, Brightness enhance by 1 ± (0–0.9), the sign drawn per use;
- Posterize keeps round(linspace(8, 4, 10)) bits, Solarize thresholds at linspace(256, 0, 10);
- AutoContrast, Equalize, Invert as PIL's ``ImageOps``; geometric fill (128, 128, 128).

:class:`CIFAR10PolicyDraw` draws a sub-policy, its two apply coins and two signs from the keyed
numpy generator of the sample (``view_draw``; both backends consume that draw). :func:`pil_op`
applies one op with PIL, as the reference does (the torch backend's executor);
:class:`TorchCIFAR10Policy` is the policy as one transform drawing from torch's generator (the
reference's composition, ``transforms.train_view_transforms``).
"""
from __future__ import annotations

import numpy as np

from . import augment_stages as st

__all__ = ["CIFAR10_POLICY", "CIFAR_FILL", "CIFAR10PolicyDraw", "TorchCIFAR10Policy", "magnitude", "op_stage",
           "pil_op"]

#: The 25 sub-policies: ((op, probability, magnitude index), (op, probability, magnitude index)).
CIFAR10_POLICY = (
    (("invert", 0.1, 7), ("contrast", 0.2, 6)),
    (("rotate", 0.7, 2), ("translateX", 0.3, 9)),
    (("sharpness", 0.8, 1), ("sharpness", 0.9, 3)),
    (("shearY", 0.5, 8), ("translateY", 0.7, 9)),
    (("autocontrast", 0.5, 8), ("equalize", 0.9, 2)),
    (("shearY", 0.2, 7), ("posterize", 0.3, 7)),
    (("color", 0.4, 3), ("brightness", 0.6, 7)),
    (("sharpness", 0.3, 9), ("brightness", 0.7, 9)),
    (("equalize", 0.6, 5), ("equalize", 0.5, 1)),
    (("contrast", 0.6, 7), ("sharpness", 0.6, 5)),
    (("color", 0.7, 7), ("translateX", 0.5, 8)),
    (("equalize", 0.3, 7), ("autocontrast", 0.4, 8)),
    (("translateY", 0.4, 3), ("sharpness", 0.2, 6)),
    (("brightness", 0.9, 6), ("color", 0.2, 8)),
    (("solarize", 0.5, 2), ("invert", 0.0, 3)),
    (("equalize", 0.2, 0), ("autocontrast", 0.6, 0)),
    (("equalize", 0.2, 8), ("equalize", 0.6, 4)),
    (("color", 0.9, 9), ("equalize", 0.6, 6)),
    (("autocontrast", 0.8, 4), ("solarize", 0.2, 8)),
    (("brightness", 0.1, 3), ("color", 0.7, 0)),
    (("solarize", 0.4, 5), ("autocontrast", 0.9, 3)),
    (("translateY", 0.9, 9), ("translateY", 0.7, 9)),
    (("autocontrast", 0.9, 2), ("solarize", 0.8, 3)),
    (("equalize", 0.8, 8), ("invert", 0.1, 3)),
    (("translateY", 0.7, 9), ("autocontrast", 0.9, 1)),
)
CIFAR_FILL = (128, 128, 128)
#: Ops whose magnitude gets a random sign in the reference (rotate does not).
SIGNED_OPS = frozenset({"shearX", "shearY", "translateX", "translateY", "color", "contrast", "sharpness",
                        "brightness"})
_ENHANCE = {"color": "Color", "contrast": "Contrast", "sharpness": "Sharpness", "brightness": "Brightness"}


def magnitude(op: str, index: int) -> float:
    """The reference's magnitude of ``op`` at bin ``index`` (0–9)."""
    if op in ("shearX", "shearY"):
        return float(np.linspace(0, 0.3, 10)[index])
    if op in ("translateX", "translateY"):
        return float(np.linspace(0, 150 / 331, 10)[index])
    if op == "rotate":
        return float(np.linspace(0, 30, 10)[index])
    if op in _ENHANCE:
        return float(np.linspace(0.0, 0.9, 10)[index])
    if op == "posterize":
        return int(np.round(np.linspace(8, 4, 10), 0).astype(np.int64)[index])
    if op == "solarize":
        return float(np.linspace(256, 0, 10)[index])
    if op in ("autocontrast", "equalize", "invert"):
        return 0.0
    raise ValueError(f"unknown CIFAR10Policy op {op!r}")


def op_stage(op: str, index: int, negate: bool, size: int):
    """The ``augment_stages`` stage of one policy op at magnitude bin ``index``."""
    m = magnitude(op, index)
    sign = -1.0 if negate and op in SIGNED_OPS else 1.0
    if op == "shearX":
        return st.shear_x(m * sign, st.INTERP_BICUBIC)
    if op == "shearY":
        return st.shear_y(m * sign, st.INTERP_BICUBIC)
    if op == "translateX":
        return st.translate(m * size * sign, 0.0, st.INTERP_NEAREST)
    if op == "translateY":
        return st.translate(0.0, m * size * sign, st.INTERP_NEAREST)
    if op == "rotate":
        return st.rotate(m, size, size, st.INTERP_NEAREST)
    if op in _ENHANCE:
        return st.enhance(_ENHANCE[op], 1 + m * sign)
    if op == "posterize":
        return st.posterize(m)
    if op == "solarize":
        return st.solarize(m)
    return {"autocontrast": st.autocontrast, "equalize": st.equalize, "invert": st.invert}[op]()


def pil_op(img, op: str, index: int, negate: bool, fill=CIFAR_FILL):
    """Apply one policy op to an RGB PIL image, with PIL, as the reference does."""
    from PIL import Image, ImageEnhance, ImageOps

    m = magnitude(op, index)
    sign = -1 if negate and op in SIGNED_OPS else 1
    w, h = img.size
    if op == "shearX":
        return img.transform(img.size, Image.AFFINE, (1, m * sign, 0, 0, 1, 0), Image.BICUBIC, fillcolor=fill)
    if op == "shearY":
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, m * sign, 1, 0), Image.BICUBIC, fillcolor=fill)
    if op == "translateX":
        return img.transform(img.size, Image.AFFINE, (1, 0, m * w * sign, 0, 1, 0), fillcolor=fill)
    if op == "translateY":
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, m * h * sign), fillcolor=fill)
    if op == "rotate":
        # The reference rotates an RGBA copy (nearest) and composites it over grey; with
        # nearest sampling the alpha is 0 or 255, so that is a nearest rotate with a grey fill.
        return img.rotate(m, fillcolor=fill)
    if op in _ENHANCE:
        return getattr(ImageEnhance, _ENHANCE[op])(img).enhance(1 + m * sign)
    if op == "posterize":
        return ImageOps.posterize(img, m)
    if op == "solarize":
        return ImageOps.solarize(img, m)
    return {"autocontrast": ImageOps.autocontrast, "equalize": ImageOps.equalize, "invert": ImageOps.invert}[op](img)


class CIFAR10PolicyDraw:
    """Keyed draws of the policy: the sub-policy (uniform over 25), then per op its apply coin
    and its sign (drawn even where unused, so the sequence is fixed)."""

    kind = "cifar"
    stages = 2

    def __init__(self, size: int = 32):
        self.size = int(size)

    def choices(self, rng: np.random.Generator):
        """(sub-policy row, ((applied, negate), (applied, negate)))."""
        row = int(rng.integers(len(CIFAR10_POLICY)))
        ops = []
        for _, p, _ in CIFAR10_POLICY[row]:
            applied = bool(rng.random() < p)
            negate = bool(rng.random() < 0.5)
            ops.append((applied, negate))
        return row, tuple(ops)

    def draw(self, rng: np.random.Generator):
        """(kinds, interps, params) of the two stages (``augment_stages.stack_stages``)."""
        row, flags = self.choices(rng)
        stages = [op_stage(op, idx, neg, self.size) if applied else st.identity()
                  for (op, _, idx), (applied, neg) in zip(CIFAR10_POLICY[row], flags)]
        return st.stack_stages(stages)


class TorchCIFAR10Policy:
    """The torch backend's CIFAR10Policy: choices from :class:`CIFAR10PolicyDraw` with a numpy
    generator seeded from torch's (keyed) generator, ops applied with :func:`pil_op`."""

    def __call__(self, img):
        import torch

        rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, ()).item()))
        row, flags = CIFAR10PolicyDraw(img.size[0]).choices(rng)
        for (op, _, idx), (applied, negate) in zip(CIFAR10_POLICY[row], flags):
            if applied:
                img = pil_op(img, op, idx, negate)
        return img

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
