"""The one keyed parameter draw of a sample's views (docs/design.md §1 "Views"), consumed by both
executors: the DALI graph (through ``dali_sources``, which encodes it as per-sample arrays) and
the torch backend (``torch_views``, which applies it with torchvision's, timm's and PIL's own
functions). For the same (seed, epoch, global position, stream) both backends therefore make
the same crop windows, flips, colour jitter (factors *and* the order of its four adjustments),
grayscale, blur and RandAugment / CIFAR10Policy choices, and their views are the same image up
to the resampling tolerances the README states.

The draw follows the reference's transforms draw for draw:

- ``RandomResizedCrop.get_params`` (torchvision): up to ten tries of area ~ U(scale)·h·w and
  log-aspect ~ U(log ratio), then the centre crop of the largest allowed aspect
  (:func:`rrc_window`); the CIFAR classification view's ``RandomCrop(size, padding=4)``: an offset
  in [−4, 4]² of the zero-padded image;
- ``RandomHorizontalFlip``: a coin with p = 0.5;
- ``ColorJitter.get_params``: a uniform permutation of (brightness, contrast, saturation, hue),
  then the factors ~ U(1 ± 0.4) and the hue ~ U(±0.1) (view 0 of the imagenet recipe: hue 0,
  i.e. no hue step), applied with p = 1 (view 0) or ``RandomApply`` p = 0.8 (sim views);
- ``RandomGrayscale`` p = 0.2 after the jitter; the CIFAR sim views' GaussianBlur p = 0.5,
  σ ~ U(0.1, 2);
- view 0's timm RandAugment or the reference's CIFAR10Policy (:class:`AugmentTables`), after
  the views, with timm's op choice, apply coin, magnitude noise, sign and interpolation.

Nothing here imports torch or DALI (the DALI reader processes unpickle it cheaply).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .augment_stages import stack_stages
from .cifar_policy import CIFAR10_POLICY, CIFAR_FILL, CIFAR10PolicyDraw, op_stage as cifar_op_stage
from .randaugment import RANDAUG_OPS, RandAugmentDraw, fill_colour, op_stage as rand_op_stage

__all__ = ["AugmentTables", "JITTER_NONE", "augment_tables", "ViewParams", "draw_views", "hue_shift", "rrc_window"]

#: RandomResizedCrop defaults (torchvision / docs/design.md §1): area scale and aspect ratio ranges.
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CIFAR_SIM_SCALE = (0.2, 1.0)
CIFAR_PAD = 4
JITTER = 0.4          # brightness, contrast and saturation factors drawn from U(1 − 0.4, 1 + 0.4)
SIM_HUE = 0.1         # hue factor of the sim views, a fraction of the colour wheel, U(−0.1, 0.1)
SIM_JITTER_P = 0.8
SIM_GRAY_P = 0.2
CIFAR_BLUR_P = 0.5
BLUR_SIGMA = (0.1, 2.0)   # PIL GaussianBlur radius σ ~ U(0.1, 2) (the reference's SimCLR blur)
#: The four ColorJitter adjustments in torchvision's numbering (``fn_idx``), and "no step".
BRIGHTNESS, CONTRAST, SATURATION, HUE, JITTER_NONE = range(5)
#: Length of :meth:`ViewParams.jitter_array`: 4 steps, 3 factors, hue shift, grayscale flag.
JITTER_PARAMS = 9


def rrc_window(rng: np.random.Generator, h: int, w: int, scale=RRC_SCALE, ratio=RRC_RATIO) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop window (y0, x0, y1, x1) for an h × w image: up to ten
    tries of area ~ U(scale)·h·w and log-aspect ~ U(log ratio), then the centre crop of the
    largest allowed aspect as a fallback."""
    area = h * w
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            y0 = int(rng.integers(0, h - ch + 1))
            x0 = int(rng.integers(0, w - cw + 1))
            return y0, x0, y0 + ch, x0 + cw
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    return y0, x0, y0 + ch, x0 + cw


def hue_shift(hue: float) -> int:
    """The uint8 amount torchvision's PIL ``adjust_hue`` adds (mod 256) to PIL's 8-bit HSV hue:
    ``np.int32(hue·255).astype(np.uint8)``, i.e. hue·255 truncated towards zero, mod 256."""
    return int(math.trunc(hue * 255.0)) % 256


@dataclass
class ViewParams:
    """One view's drawn parameters (see the module docstring).

    ``window`` (y0, x0, y1, x1) in the pixels of the image the view is cut from: a
    RandomResizedCrop window, or for ``pad_crop`` the size × size window of the 4-pixel
    zero-padded image, offset by (y0, x0) ∈ [−4, 4]². ``steps``: the ColorJitter adjustments
    in the order they run (torchvision's ``fn_idx``; :data:`JITTER_NONE` where a step is not
    run), with ``factors`` (brightness, contrast, saturation, hue). ``blur``: σ, 0 = none."""

    window: tuple[int, int, int, int]
    flip: bool = False
    pad_crop: bool = False
    steps: tuple[int, int, int, int] = (JITTER_NONE,) * 4
    factors: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 0.0)
    gray: bool = False
    blur: float = 0.0

    def jitter_array(self) -> np.ndarray:
        """float64 (JITTER_PARAMS,): the 4 steps, the 3 factors, the hue shift (0–255, as the
        graph adds it to the 8-bit hue), the grayscale flag: what the DALI graph reads."""
        b, c, s, h = self.factors
        return np.array([*self.steps, b, c, s, hue_shift(h), float(self.gray)], np.float64)


def _jitter(rng: np.random.Generator, hue: float):
    """ColorJitter.get_params: (steps, factors); hue 0 means torchvision's hue=None: no hue step."""
    order = rng.permutation(4)
    b, c, s = (float(rng.uniform(1 - JITTER, 1 + JITTER)) for _ in range(3))
    h = float(rng.uniform(-hue, hue)) if hue else 0.0
    steps = tuple(int(k) if (k != HUE or hue) else JITTER_NONE for k in order)
    return steps, (b, c, s, h)


def draw_views(rng: np.random.Generator, recipe: str, hw: tuple[int, int], views: int, *,
               augment: bool = True, sim_from: int = 1) -> list[ViewParams]:
    """The parameters of ``views`` views of an h × w image; view v < ``sim_from`` is the
    classification view (recipe "imagenet" or "cifar"), the others the contrastive "sim" views.
    ``augment=False``: every view is the whole image (the deterministic test mode)."""
    h, w = int(hw[0]), int(hw[1])
    out = []
    for v in range(views):
        if not augment:
            out.append(ViewParams(window=(0, 0, h, w)))
            continue
        sim = v >= sim_from
        pad_crop = recipe == "cifar" and not sim
        if pad_crop:
            dy, dx = (int(d) for d in rng.integers(0, 2 * CIFAR_PAD + 1, size=2) - CIFAR_PAD)
            window = (dy, dx, dy + h, dx + w)
        else:
            window = rrc_window(rng, h, w, scale=CIFAR_SIM_SCALE if recipe == "cifar" else RRC_SCALE)
        p = ViewParams(window=window, flip=bool(rng.random() < 0.5), pad_crop=pad_crop)
        if not sim:
            if recipe == "imagenet":  # ColorJitter(0.4, 0.4, 0.4, 0) with p = 1
                p.steps, p.factors = _jitter(rng, 0.0)
        else:
            if rng.random() < SIM_JITTER_P:  # RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p = 0.8)
                p.steps, p.factors = _jitter(rng, SIM_HUE)
            p.gray = bool(rng.random() < SIM_GRAY_P)
            if recipe == "cifar" and rng.random() < CIFAR_BLUR_P:
                p.blur = float(rng.uniform(*BLUR_SIGMA))
        out.append(p)
    return out


class AugmentTables:
    """View 0's automatic augmentation (picklable): ``"rand"`` timm's RandAugment
    (``randaugment.RandAugmentDraw``), ``"cifar"`` the reference's CIFAR10Policy
    (``cifar_policy.CIFAR10PolicyDraw``), ``"none"``. :meth:`choices` is the keyed draw both
    backends consume; :meth:`stage_arrays` turns it into the ``augment_stages`` arrays of the DALI
    graph, :meth:`ops` into the (op, arguments) list the torch executor applies."""

    def __init__(self, kind: str, *, size: int = 224, n: int = 2, m: int = 10, mstd: float = 0.5):
        if kind == "rand":
            self._draw = RandAugmentDraw(size, n, m, mstd)
        elif kind == "cifar":
            self._draw = CIFAR10PolicyDraw(size)
        elif kind == "none":
            self._draw = None
        else:
            raise ValueError(f"augmentation kind must be 'rand', 'cifar' or 'none'; got {kind!r}")
        self.kind, self.size = kind, int(size)

    @property
    def stages(self) -> int:
        """Stages per image (timm's n; 2 for the CIFAR policy; 0 for none)."""
        return 0 if self._draw is None else self._draw.stages

    def choices(self, rng: np.random.Generator):
        """The keyed draw: RandAugment (op, applied, magnitude, negate, bicubic) per stage; CIFAR
        (sub-policy row, ((applied, negate), (applied, negate))); None for "none"."""
        return None if self._draw is None else self._draw.choices(rng)

    def ops(self, choices) -> list[tuple]:
        """The applied ops of ``choices`` in order: ("rand", name, magnitude, negate, bicubic) or
        ("cifar", op, magnitude bin, negate)."""
        if self.kind == "rand":
            return [("rand", RANDAUG_OPS[op], mag, neg, bic) for op, applied, mag, neg, bic in choices if applied]
        if self.kind == "cifar":
            row, flags = choices
            return [("cifar", op, idx, neg) for (op, _, idx), (applied, neg) in zip(CIFAR10_POLICY[row], flags)
                    if applied]
        return []

    def stage_arrays(self, choices):
        """(kinds int32 (S,), interps int32 (S,), params float64 (S, NUM_PARAMS)) of ``choices``."""
        from . import augment_stages as st

        if self.kind == "rand":
            return stack_stages([rand_op_stage(RANDAUG_OPS[op], mag, neg, bic, self.size) if applied
                                 else st.identity() for op, applied, mag, neg, bic in choices])
        if self.kind == "cifar":
            row, flags = choices
            return stack_stages([cifar_op_stage(op, idx, neg, self.size) if applied else st.identity()
                                 for (op, _, idx), (applied, neg) in zip(CIFAR10_POLICY[row], flags)])
        return stack_stages([])

    def draw(self, rng: np.random.Generator):
        """:meth:`stage_arrays` of a fresh :meth:`choices` draw."""
        return self.stage_arrays(self.choices(rng))


def augment_tables(recipe: str, size: int, enabled: bool, *, n: int = 2, m: int = 10, mstd: float = 0.5,
                   mean=(0.485, 0.456, 0.406)) -> tuple[AugmentTables, tuple[int, ...]]:
    """(AugmentTables, geometric fill colour 0–255) of view 0. imagenet: timm's RandAugment n, m,
    mstd with the mean colour as fill (the reference's ``img_mean``); cifar: the reference's
    CIFAR10Policy with its grey fill; ``enabled`` False: none."""
    if not enabled:
        return AugmentTables("none"), CIFAR_FILL
    if recipe == "imagenet":
        return AugmentTables("rand", size=size, n=n, m=m, mstd=mstd), fill_colour(mean)
    return AugmentTables("cifar", size=size), CIFAR_FILL
