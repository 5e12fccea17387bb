"""Per-sample sources of the DALI training graph: the background and foreground streams of
docs/design.md §1 ("Samplers", "Views", "CutMix"), each a pure function of
(epoch, sample index), so that a rebuilt pipeline continues exactly where the last one stopped.

DALI calls a source in its Python worker processes (``fn.external_source(parallel=True,
batch=False)``) with a ``SampleInfo`` (``epoch_idx``, ``idx_in_epoch``). The source maps that
to a sample position of one of our epochs, reads the encoded bytes of the stream's image
there, checks the header (a corrupt, truncated or missing file is handled by
``on_error`` *here*, where the file name is known), and draws every random parameter of
the sample's views from the sample's key (seed, epoch, global position, stream):
RandomResizedCrop windows, flips, colour jitter and grayscale, blur, the RandAugment /
CIFAR10Policy stages of view 0 (op, apply coin, magnitude, sign, interpolation: see
``randaugment``, ``cifar_policy``), and — for the foreground — the CutMix box and λ. The DALI
graph itself then contains no random operator, so the batches do not depend on DALI's threads, worker
count, prefetching or on the pipeline having been rebuilt, and a resumed epoch
(``start_step``) continues exactly where the original one was.

Nothing here imports DALI: the module is also what spawned workers unpickle.
"""
from __future__ import annotations

import math

import numpy as np

from .augment_stages import stack_stages
from .cifar_policy import CIFAR10PolicyDraw
from .common import (DEFAULT_MAX_IMAGE_PIXELS, BadImageError, SpawnedReaderSource, Stream, StreamPlan, Substitutes, check_encoded_image,
                     cutmix_boxes, image_storage, keyed_rng, load_with_policy)
from .randaugment import RandAugmentDraw

__all__ = ["AugmentTables", "BackgroundSource", "ForegroundSource", "SourceConfig", "pil_blur_taps", "rrc_window"]

#: RandomResizedCrop defaults (torchvision / docs/design.md §1): area scale and aspect ratio ranges.
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CIFAR_SIM_SCALE = (0.2, 1.0)
CIFAR_PAD = 4
JITTER = 0.4          # brightness, contrast and saturation factors drawn from U(1 − 0.4, 1 + 0.4)
SIM_HUE = 0.1         # hue shift of the sim views, a fraction of the colour wheel
SIM_JITTER_P = 0.8
SIM_GRAY_P = 0.2
CIFAR_BLUR_P = 0.5
BLUR_SIGMA = (0.1, 2.0)   # PIL GaussianBlur radius σ ~ U(0.1, 2) (the reference's SimCLR blur)
BLUR_TAPS = 5             # one PIL box pass for σ <= 2 spans offsets −2 … 2


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


def pil_box_radius(sigma: float, passes: int = 3) -> np.float32:
    """The extended-box radius PIL's ``GaussianBlur(radius=σ)`` uses for each of its ``passes``
    box passes (``BoxBlur.c``: Gwosdek et al.'s formula), in PIL's float32 arithmetic."""
    f = np.float32
    r = f(sigma)
    sigma2 = r * r / f(passes)
    length = f(math.sqrt(12.0 * float(sigma2) + 1.0))
    whole = f(math.floor((float(length) - 1.0) / 2.0))
    frac = (f(2) * whole + f(1)) * (whole * (whole + f(1)) - f(3) * sigma2)
    frac = frac / (f(6) * (sigma2 - (whole + f(1)) * (whole + f(1))))
    return f(whole + frac)


def pil_blur_taps(sigma: float) -> np.ndarray:
    """One pass of PIL's box blur for σ as integer weights in 2^-24 units for offsets −2 … 2:
    2R+1 inner taps of ``ww`` and two outer taps of ``fw``, as ``ImagingHorizontalBoxBlur``
    computes them (R = ⌊radius⌋ ≤ 1 for σ ≤ 2; all zero for σ = 0, meaning no blur)."""
    if sigma <= 0:
        return np.zeros(BLUR_TAPS, np.int64)
    radius = pil_box_radius(sigma)
    whole = int(radius)
    if whole > BLUR_TAPS // 2 - 1:
        raise ValueError(f"blur sigma {sigma} needs a box radius of {radius:.3f}; the DALI blur supports sigma <= "
                         f"{BLUR_SIGMA[1]} (box radius < {BLUR_TAPS // 2})")
    ww = int(np.float32(1 << 24) / (radius * np.float32(2) + np.float32(1)))
    fw = ((1 << 24) - (2 * whole + 1) * ww) // 2
    taps = np.zeros(BLUR_TAPS, np.int64)
    mid = BLUR_TAPS // 2
    taps[mid - whole:mid + whole + 1] = ww
    taps[mid - whole - 1] = taps[mid + whole + 1] = fw
    return taps


class AugmentTables:
    """What a source needs to draw view 0's automatic augmentation (picklable, no DALI):
    ``"rand"`` timm's RandAugment (``randaugment.RandAugmentDraw``), ``"cifar"`` the reference's
    CIFAR10Policy (``cifar_policy.CIFAR10PolicyDraw``), ``"none"``. :meth:`draw` returns the
    per-sample stage arrays of ``augment_stages`` that the graph applies."""

    def __init__(self, kind: str, *, size: int = 224, n: int = 2, m: int = 10, mstd: float = 0.5):
        if kind == "rand":
            self._draw = RandAugmentDraw(size, n, m, mstd)
        elif kind == "cifar":
            self._draw = CIFAR10PolicyDraw(size)
        elif kind == "none":
            self._draw = None
        else:
            raise ValueError(f"augmentation kind must be 'rand', 'cifar' or 'none'; got {kind!r}")
        self.kind = kind

    @property
    def stages(self) -> int:
        return 0 if self._draw is None else self._draw.stages

    def draw(self, rng: np.random.Generator):
        """(kinds int32 (S,), interps int32 (S,), params float64 (S, NUM_PARAMS))."""
        if self._draw is None:
            return stack_stages([])
        return self._draw.draw(rng)


class SourceConfig:
    """What both sources need; pickled once into every DALI worker.

    ``base_epoch``/``base_step``: DALI's epoch 0 of this pipeline object is our epoch
    ``base_epoch`` starting at step ``base_step``; DALI epoch k > 0 is our epoch base_epoch + k
    from step 0. ``bad``: dataset indices already known to be undecodable (found by the
    pipeline after a decoder error), replaced like any other bad image.
    """

    def __init__(self, *, dataset, recipe: str, plan: StreamPlan, image_size: int, augment: bool,
                 tables: AugmentTables, seed: int, rank: int, cutmix_prob: float, cutmix_per_sample: bool,
                 cutmix_alpha: float, on_error: str, base_epoch: int, base_step: int, bad=(),
                 with_foreground: bool = False, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self.dataset, self.recipe, self.plan = dataset, recipe, plan
        self.arrays = image_storage(dataset) == "arrays"  # decoded in memory, else encoded files
        self.size, self.augment, self.tables = image_size, augment, tables
        self.seed, self.rank = seed, rank
        self.cutmix_prob, self.cutmix_per_sample, self.cutmix_alpha = cutmix_prob, cutmix_per_sample, cutmix_alpha
        self.on_error = on_error
        self.base_epoch, self.base_step = base_epoch, base_step
        self.bad = tuple(sorted(int(b) for b in bad))
        self.with_foreground = with_foreground
        self.max_pixels = max_pixels  # data.max_image_pixels, checked from the header before DALI decodes


class _Source(SpawnedReaderSource):
    stream = 0

    def __init__(self, cfg: SourceConfig):
        self.cfg = cfg
        self._subst = None  # built lazily in the worker

    def _locate(self, info):
        """(epoch, position) of a DALI SampleInfo; StopIteration past this epoch's last whole batch."""
        c = self.cfg
        k = int(info.epoch_idx)
        first = c.base_step * c.plan.batch_size if k == 0 else 0
        pos = first + int(info.idx_in_epoch)
        if pos >= c.plan.steps_per_epoch * c.plan.batch_size:
            raise StopIteration
        return c.base_epoch + k, pos

    def _load(self, index: int, key):
        """(data, (h, w), used index, bad record) with the on_error policy applied."""
        c = self.cfg
        if self._subst is None:
            self._subst = Substitutes(c.plan.labels, c.bad)
        known_bad = self._subst.bad

        # The CIFAR recipe's views are drawn for the size × size image the graph first resizes
        # every input to (``dali_ops.fit``); the imagenet recipe's for the image as it is.
        fit = (c.size, c.size) if c.recipe == "cifar" else None
        if c.arrays:
            def load(i):
                img = np.ascontiguousarray(c.dataset.images[i])
                return img, fit or img.shape[:2]
        else:
            def load(i):
                if i in known_bad and c.on_error == "skip":
                    raise ValueError("the DALI decoder failed on this file earlier in the run")
                data = c.dataset.read_bytes(i)
                hw = check_encoded_image(data, c.max_pixels)
                return np.frombuffer(data, dtype=np.uint8), fit or hw

        (data, hw), used, skipped = load_with_policy(c.dataset, index, key, c.on_error, self._subst, load)
        first_bad = index if skipped else -1
        return data, hw, used, np.array([first_bad, len(skipped)], dtype=np.int64)

    def _view_params(self, rng, hw, views: int, sim_from: int):
        """Crop windows (views, 4) float32 as (y0, x0, y1, x1) — x0 > x1 where the view is mirrored,
        except for the CIFAR pad-crop view, which uses the flip flag — flips (views,) int32, colour
        (views, 4) float32 as (brightness, contrast, saturation, hue in degrees), blur (views, 5)
        int64: PIL's box-pass taps for the view's σ (:func:`pil_blur_taps`; all zero = no blur).
        View v < sim_from uses the classification recipe, others "sim"."""
        c = self.cfg
        h, w = hw
        crops = np.zeros((views, 4), np.float32)
        flips = np.zeros(views, np.int32)
        colour = np.tile(np.array([1.0, 1.0, 1.0, 0.0], np.float32), (views, 1))
        blur = np.zeros((views, BLUR_TAPS), np.int64)
        for v in range(views):
            if not c.augment:
                crops[v] = (0, 0, h, w)
                continue
            sim = v >= sim_from
            pad_crop = c.recipe == "cifar" and not sim
            if pad_crop:
                # RandomCrop(size, padding 4): a window of the padded image, i.e. offsets in [−4, 4].
                dy, dx = rng.integers(0, 2 * CIFAR_PAD + 1, size=2) - CIFAR_PAD
                crops[v] = (dy, dx, dy + h, dx + w)
            else:
                scale = CIFAR_SIM_SCALE if c.recipe == "cifar" else RRC_SCALE
                crops[v] = rrc_window(rng, h, w, scale=scale)
            flips[v] = rng.random() < 0.5
            if flips[v] and not pad_crop:
                # A horizontal flip after the crop-and-resize is the same resize of the mirrored
                # window (x0 > x1): fn.resize flips for free, no extra pass over the pixels.
                crops[v, [1, 3]] = crops[v, [3, 1]]
            if not sim:
                if c.recipe == "imagenet":  # ColorJitter(0.4, 0.4, 0.4, 0) with p = 1
                    colour[v, :3] = rng.uniform(1 - JITTER, 1 + JITTER, size=3)
                continue
            if rng.random() < SIM_JITTER_P:  # ColorJitter(0.4, 0.4, 0.4, 0.1) with p = 0.8
                colour[v, :3] = rng.uniform(1 - JITTER, 1 + JITTER, size=3)
                colour[v, 3] = rng.uniform(-SIM_HUE, SIM_HUE) * 360.0
            if rng.random() < SIM_GRAY_P:  # RandomGrayscale(p = 0.2): no saturation left
                colour[v, 2] = 0.0
            if c.recipe == "cifar" and rng.random() < CIFAR_BLUR_P:
                blur[v] = pil_blur_taps(rng.uniform(*BLUR_SIGMA))
        return crops, flips, colour, blur


class BackgroundSource(_Source):
    """The background (canvas) stream: image, label and the parameters of its three views.

    Outputs: data (encoded bytes, or the HWC array of an array dataset), label int64 (), crops (3, 4),
    flips (3,), colour (3, 4), blur taps (3, 5), view 0's augmentation stages — kinds (S,),
    interps (S,), params (S, 9) (``augment_stages``) — and the bad-input record int64 (2,) =
    (first replaced dataset index or −1, number of replacements).
    """

    stream = Stream.BACKGROUND
    num_outputs = 10

    def __call__(self, info):
        epoch, pos = self._locate(info)
        c = self.cfg
        bg, _ = c.plan.epoch_indices(epoch)
        key = (c.seed, epoch, c.plan.position(*divmod(pos, c.plan.batch_size)), self.stream)
        data, hw, used, bad = self._load(int(bg[pos]), key)
        rng = keyed_rng(*key)
        crops, flips, colour, blur = self._view_params(rng, hw, 3, sim_from=1)
        kinds, interps, params = c.tables.draw(rng)
        label = np.array(c.plan.labels[used], dtype=np.int64)
        return data, label, crops, flips, colour, blur, kinds, interps, params, bad


class ForegroundSource(_Source):
    """The foreground (patch) stream and the CutMix decision of its sample.

    Outputs: data, label int64 (), crops (1, 4), flips (1,), colour (1, 4), augmentation stages
    (kinds, interps, params, as the background's), bad (2,), then mixed bool (), λ float32 (),
    and the ``fn.multi_paste`` regions: anchors
    int32 (2, 2) and shapes int32 (2, 2) — region 0 is the whole background canvas, region 1
    the box (y0, x0, h, w) taken from the foreground at the same place.
    Where no box is pasted the image is not read (the graph does not decode it).
    """

    stream = Stream.FOREGROUND
    num_outputs = 13

    def __call__(self, info):
        epoch, pos = self._locate(info)
        c = self.cfg
        b, s = c.plan.batch_size, c.size
        step, i = divmod(pos, b)
        gpos = c.plan.position(step, i)
        boxes, lam, applied = cutmix_boxes(c.seed, epoch, step, [gpos], s, s, prob=c.cutmix_prob,
                                           per_sample=c.cutmix_per_sample, alpha=c.cutmix_alpha)
        mixed = bool(applied[0])
        _, fg = c.plan.epoch_indices(epoch)
        key = (c.seed, epoch, gpos, self.stream)
        if mixed or c.with_foreground:
            data, hw, used, bad = self._load(int(fg[pos]), key)
        else:
            # Not decoded (the graph's paste branch skips this sample): a placeholder keeps
            # the batch shape; the label is unused (label_b = label_a where not mixed).
            data = np.zeros((1, 1, 3) if c.arrays else 1, np.uint8)
            hw, used, bad = (1, 1), int(fg[pos]), np.array([-1, 0], np.int64)
        rng = keyed_rng(*key)
        crops, flips, colour, _ = self._view_params(rng, hw, 1, sim_from=1)
        kinds, interps, params = c.tables.draw(rng)
        y0, x0, y1, x1 = (int(v) for v in boxes[0])
        anchors = np.array([[0, 0], [y0, x0]], np.int32)
        shapes = np.array([[s, s], [y1 - y0, x1 - x0]], np.int32)
        label = np.array(c.plan.labels[used], dtype=np.int64)
        return (data, label, crops, flips, colour, kinds, interps, params, bad, np.array(mixed),
                np.array(lam[0], np.float32), anchors, shapes)


def raise_from_worker(err: BaseException):
    """Re-raise a DALI worker failure as the :class:`BadImageError` it carries, if any.

    DALI forwards an exception from a Python worker as a generic ``Exception`` whose text
    holds the worker's traceback; the last ``BadImageError: ...`` line names the file.
    """
    text = str(err)
    marker = "BadImageError: "
    at = text.rfind(marker)
    if at >= 0:
        msg = text[at + len(marker):].strip().splitlines()
        raise BadImageError(msg[0] if msg else text) from err
