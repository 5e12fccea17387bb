"""RandAugment of the classification view, as the reference configures it (docs/design.md §1
"Views"): timm's ``rand_augment_transform('rand-n2-m10-mstd0.5', {translate_const:
int(size·0.45), img_mean: dataset mean in 0–255})``.

timm's RandAugment picks ``n`` of 15 ops per image, uniformly with replacement; each runs with
probability 0.5 at a magnitude ~ N(m, mstd) clipped to timm's 0–10 scale (uniform on [0, m]
when mstd > 100, as timm reads it), negated with probability 0.5 for the signed ops (rotate
±30°, shear ±0.3, translate ±45 % of the side at full strength), with the geometric ops
resampling bilinearly or bicubically (chosen per op) and filling with the mean colour.

- :class:`RandAugmentDraw` draws timm's choices from the keyed numpy generator of the sample
  (``view_draw``); both backends consume that one draw: the torch backend applies timm's own op
  functions at the drawn arguments (``torch_views.timm_op``), the DALI backend encodes them as
  ``augment_stages`` stages, which ``dali_augment`` applies.
- :func:`torch_randaugment` is timm's own transform drawing its own choices (from torch's
  generator through :class:`KeyedGlobalRandom`, because timm draws from Python's ``random`` and
  numpy's global generator): the reference's composition (``transforms.train_view_transforms``),
  whose distributions the draw reproduces.
  ``translate_const`` only matters to timm's absolute-pixel translate ops, which are not among
  the 15; it is passed for fidelity with the reference.
"""
from __future__ import annotations

import random

import numpy as np

from . import augment_stages as st

__all__ = ["RANDAUG_OPS", "KeyedGlobalRandom", "RandAugmentDraw", "check_randaugment", "fill_colour",
           "op_stage", "torch_randaugment"]

#: The 15 ops of timm's default RandAugment (``timm.data.auto_augment._RAND_TRANSFORMS``), in its order.
RANDAUG_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
               "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
#: Ops whose argument timm negates with probability 0.5.
SIGNED_OPS = frozenset({"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"})
#: Ops that resample (bilinear or bicubic, drawn per op) and fill with the mean colour.
GEOMETRIC_OPS = SIGNED_OPS
LEVEL_MAX = 10.0  # timm's _LEVEL_DENOM: magnitudes are clipped to [0, 10]
APPLY_PROB = 0.5
TRANSLATE_PCT = 0.45


def fill_colour(mean) -> tuple[int, ...]:
    """The reference's ``img_mean``: the dataset mean in 0–255, ``min(255, round(255·m))``."""
    return tuple(min(255, round(255 * float(m))) for m in mean)


def check_randaugment(n, m, mstd) -> None:
    """ValueError unless (n, m, mstd) is a RandAugment setting timm can express."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"randaugment_n (ops per image) must be an integer >= 0; got {n!r}")
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or not 0 <= m <= LEVEL_MAX:
        raise ValueError(f"randaugment_m must be an integer magnitude on timm's 0-10 scale (10 = full strength, "
                         f"the reference); got {m!r}")
    if isinstance(mstd, bool) or not isinstance(mstd, (int, float, np.floating)) or not mstd >= 0:
        raise ValueError(f"randaugment_mstd must be a number >= 0 (0: fixed magnitude; > 100: uniform in [0, m], "
                         f"as timm reads it); got {mstd!r}")


def torch_randaugment(size: int, mean, n: int = 2, m: int = 10, mstd: float = 0.5):
    """timm's ``rand_augment_transform`` with the reference's hyper-parameters, wrapped so that
    its draws come from torch's generator (see :class:`KeyedGlobalRandom`). Input and output:
    RGB PIL images."""
    from timm.data.auto_augment import rand_augment_transform

    check_randaugment(n, m, mstd)
    hparams = {"translate_const": int(size * TRANSLATE_PCT), "img_mean": fill_colour(mean)}
    return KeyedGlobalRandom(rand_augment_transform(f"rand-n{int(n)}-m{int(m)}-mstd{float(mstd)}", hparams))


class KeyedGlobalRandom:
    """Run ``transform`` with Python's ``random`` and numpy's global generator seeded from
    torch's generator, restoring both states afterwards.

    The torch loader seeds torch per sample from the sample's key, so the seed drawn here, and
    with it every choice timm makes, is a pure function of that key; the caller's ``random``
    and ``np.random`` states are left exactly as they were."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, img):
        import torch

        seed = int(torch.randint(0, 2 ** 62, ()).item())
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            random.seed(seed)
            np.random.seed([seed & 0xFFFFFFFF, seed >> 32])
            return self.transform(img)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r})"


def op_stage(name: str, magnitude: float, negate: bool, bicubic: bool, size: int):
    """The stage of timm op ``name`` at ``magnitude`` (0–10), with timm's magnitude-to-argument
    rules (``timm.data.auto_augment.LEVEL_TO_ARG``), on a size × size image."""
    level = magnitude / LEVEL_MAX
    sign = -1.0 if negate else 1.0
    interp = st.INTERP_BICUBIC if bicubic else st.INTERP_BILINEAR
    if name == "AutoContrast":
        return st.autocontrast()
    if name == "Equalize":
        return st.equalize()
    if name == "Invert":
        return st.invert()
    if name == "Rotate":
        return st.rotate(sign * level * 30.0, size, size, interp)
    if name == "Posterize":
        return st.posterize(int(level * 4))
    if name == "Solarize":
        return st.solarize(min(256, int(level * 256)))
    if name == "SolarizeAdd":
        return st.solarize_add(min(128, int(level * 110)))
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return st.enhance(name, level * 1.8 + 0.1)
    if name == "ShearX":
        return st.shear_x(sign * level * 0.3, interp)
    if name == "ShearY":
        return st.shear_y(sign * level * 0.3, interp)
    if name == "TranslateXRel":
        return st.translate(sign * level * TRANSLATE_PCT * size, 0.0, interp)
    if name == "TranslateYRel":
        return st.translate(0.0, sign * level * TRANSLATE_PCT * size, interp)
    raise ValueError(f"unknown RandAugment op {name!r}; expected one of {RANDAUG_OPS}")


class RandAugmentDraw:
    """The DALI source's RandAugment: per stage, five keyed draws — op (uniform over the 15,
    with replacement), apply coin (p 0.5), magnitude, sign, bilinear/bicubic — always all
    five, so the draw sequence does not depend on earlier outcomes."""

    kind = "rand"

    def __init__(self, size: int, n: int = 2, m: int = 10, mstd: float = 0.5):
        check_randaugment(n, m, mstd)
        self.size, self.n, self.m, self.mstd = int(size), int(n), int(m), float(mstd)

    @property
    def stages(self) -> int:
        return self.n

    def choices(self, rng: np.random.Generator):
        """(op index, applied, magnitude, negate, bicubic) for each of the ``n`` stages."""
        out = []
        for _ in range(self.n):
            op = int(rng.integers(len(RANDAUG_OPS)))
            applied = bool(rng.random() < APPLY_PROB)
            if self.mstd > 100:  # timm: "mstd > 100" means uniform in [0, m]
                mag = float(rng.uniform(0.0, self.m))
            else:
                mag = float(rng.normal(self.m, self.mstd)) if self.mstd > 0 else float(self.m)
            mag = min(LEVEL_MAX, max(0.0, mag))
            negate = bool(rng.random() < 0.5)
            bicubic = bool(rng.random() < 0.5)
            out.append((op, applied, mag, negate, bicubic))
        return out

    def draw(self, rng: np.random.Generator):
        """(kinds, interps, params) of the ``n`` stages (``augment_stages.stack_stages``)."""
        stages = [op_stage(RANDAUG_OPS[op], mag, neg, bic, self.size) if applied else st.identity()
                  for op, applied, mag, neg, bic in self.choices(rng)]
        return st.stack_stages(stages)
