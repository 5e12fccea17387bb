"""Per-sample sources of the DALI training graph: the background and foreground streams of
docs/design.md §1 ("Samplers", "Views", "CutMix"), each a pure function of
(epoch, sample index), so that a rebuilt pipeline continues exactly where the last one stopped.

DALI calls a source in its Python worker processes (``fn.external_source(parallel=True,
batch=False)``) with a ``SampleInfo`` (``epoch_idx``, ``idx_in_epoch``). The source maps that
to a sample position of one of our epochs, reads the encoded bytes of the stream's image
there, checks the header (a corrupt, truncated or missing file is handled by
``on_error`` *here*, where the file name is known), and draws every random parameter of
the sample's views from the sample's key (seed, epoch, global position, stream) — the draw of
``view_draw``, the one the torch backend consumes too: RandomResizedCrop windows, flips,
colour jitter (factors and order) and grayscale, blur, the RandAugment / CIFAR10Policy stages
of view 0 (op, apply coin, magnitude, sign, interpolation: see ``randaugment``,
``cifar_policy``), and — for the foreground — the CutMix box and λ. The DALI
graph itself then contains no random operator, so the batches do not depend on DALI's threads, worker
count, prefetching or on the pipeline having been rebuilt, and a resumed epoch
(``start_step``) continues exactly where the original one was.

Nothing here imports DALI: the module is also what spawned workers unpickle.
"""
from __future__ import annotations

import math

import numpy as np

from .common import (DEFAULT_MAX_IMAGE_PIXELS, BadImageError, SpawnedReaderSource, Stream, StreamPlan, Substitutes,
                     check_encoded_image, cutmix_boxes, image_storage, keyed_rng, load_with_policy)
from .view_draw import BLUR_SIGMA, JITTER_PARAMS, AugmentTables, draw_views, rrc_window

__all__ = ["AugmentTables", "BackgroundSource", "ForegroundSource", "SourceConfig", "pil_blur_taps", "rrc_window",
           "view_arrays"]

BLUR_TAPS = 5             # one PIL box pass for σ <= 2 spans offsets −2 … 2


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

    def _view_params(self, rng, hw, views: int):
        """The keyed view draw (``view_draw.draw_views``; view 0 the classification view) as the
        graph's arrays (:func:`view_arrays`)."""
        c = self.cfg
        return view_arrays(draw_views(rng, c.recipe, hw, views, augment=c.augment))


def view_arrays(params) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The DALI graph's per-sample arrays of a list of ``view_draw.ViewParams``: crop windows
    (views, 4) float32 (y0, x0, y1, x1) — x0 > x1 where the view is mirrored, except for the CIFAR
    pad-crop view, which uses the flip flag —, flips (views,) int32, jitter (views, JITTER_PARAMS)
    float64 (``ViewParams.jitter_array``), blur (views, 5) int64: PIL's box-pass taps for the
    view's σ (:func:`pil_blur_taps`; all zero = no blur)."""
    views = len(params)
    crops = np.zeros((views, 4), np.float32)
    flips = np.zeros(views, np.int32)
    jitter = np.zeros((views, JITTER_PARAMS), np.float64)
    blur = np.zeros((views, BLUR_TAPS), np.int64)
    for v, p in enumerate(params):
        crops[v] = p.window
        flips[v] = p.flip
        if p.flip and not p.pad_crop:
            # A horizontal flip after the crop-and-resize is the same resize of the mirrored
            # window (x0 > x1): fn.resize flips for free, no extra pass over the pixels.
            crops[v, [1, 3]] = crops[v, [3, 1]]
        jitter[v] = p.jitter_array()
        blur[v] = pil_blur_taps(p.blur)
    return crops, flips, jitter, blur


class BackgroundSource(_Source):
    """The background (canvas) stream: image, label and the parameters of its three views.

    Outputs: data (encoded bytes, or the HWC array of an array dataset), label int64 (), crops (3, 4),
    flips (3,), jitter (3, 9), blur taps (3, 5), view 0's augmentation stages — kinds (S,),
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
        crops, flips, jitter, blur = self._view_params(rng, hw, 3)
        kinds, interps, params = c.tables.draw(rng)
        label = np.array(c.plan.labels[used], dtype=np.int64)
        return data, label, crops, flips, jitter, blur, kinds, interps, params, bad


class ForegroundSource(_Source):
    """The foreground (patch) stream and the CutMix decision of its sample.

    Outputs: data, label int64 (), crops (1, 4), flips (1,), jitter (1, 9), augmentation stages
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
        crops, flips, jitter, _ = self._view_params(rng, hw, 1)
        kinds, interps, params = c.tables.draw(rng)
        y0, x0, y1, x1 = (int(v) for v in boxes[0])
        anchors = np.array([[0, 0], [y0, x0]], np.int32)
        shapes = np.array([[s, s], [y1 - y0, x1 - x0]], np.int32)
        label = np.array(c.plan.labels[used], dtype=np.int64)
        return (data, label, crops, flips, jitter, kinds, interps, params, bad, np.array(mixed),
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
