"""DALI graph helpers shared by the training and validation pipelines (docs/design.md §1
"Views", §3 pipeline contract): decode, crop-and-resize, flip, colour, blur, RandAugment /
CIFAR10Policy with externally drawn (keyed) choices, and normalisation to NCHW float.

Every helper takes its random parameters as per-sample tensors drawn by the keyed sources
(``dali_sources``), never from DALI's own random operators; that is what keeps the graph
deterministic under rebuilds and resume. The functions must be called inside a
``@pipeline_def(enable_conditionals=True)`` function: the blur and the augmentation stages
use DALI conditionals. The augmentation ops themselves, written to give PIL's pixels, are in
``dali_augment``.

Where data lives: with ``device="gpu"`` the decoder runs as ``mixed`` (nvJPEG; the bytes
come from the host sources and the decoded images land on the GPU) and every image
operator after it runs on the GPU; the per-sample parameters stay host tensors (DALI
argument inputs are always on the CPU). That is the only difference from ``device="cpu"``.
"""
from __future__ import annotations

from typing import Sequence

from nvidia.dali import fn, math as dmath, types
from nvidia.dali.pipeline import do_not_convert

from . import dali_augment
from .spec import IMAGENET_MEAN
from .common import image_storage
from .view_draw import AugmentTables, augment_tables as _tables

__all__ = ["AugmentGraph", "augment_tables", "blur", "crop_resize", "decode", "fit", "jitter", "keyed_augment",
           "needs_fit", "normalize"]


class AugmentGraph:
    """What the graph needs to apply view 0's keyed stages: how many, the geometric fill
    colour (0–255 per channel) and the view size."""

    def __init__(self, stages: int, fill: Sequence[int], size: int):
        self.stages, self.fill, self.size = int(stages), tuple(int(f) for f in fill), int(size)


def augment_tables(recipe: str, size: int, enabled: bool, *, n: int = 2, m: int = 10, mstd: float = 0.5,
                   mean: Sequence[float] = IMAGENET_MEAN) -> tuple[AugmentTables, AugmentGraph]:
    """(AugmentTables for the sources, AugmentGraph for the graph) of view 0.

    imagenet: timm's RandAugment n, m, mstd with the mean colour as fill (the reference's
    ``img_mean``); cifar: the reference's CIFAR10Policy with its grey fill."""
    tables, fill = _tables(recipe, size, enabled, n=n, m=m, mstd=mstd, mean=mean)
    return tables, AugmentGraph(tables.stages, fill, size)


@do_not_convert
def decode(data, arrays: bool, device: str):
    """Encoded bytes -> HWC uint8 RGB. ``mixed`` = nvJPEG on the GPU; ``arrays`` (an in-memory
    array dataset) are already decoded and only move to the GPU."""
    if arrays:
        return data.gpu() if device == "gpu" else data  # host -> GPU copy here in GPU mode
    return fn.decoders.image(data, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)


def needs_fit(recipe: str, dataset, size: int) -> bool:
    """Whether the graph resizes every decoded image to size × size before the views (:func:`fit`):
    the CIFAR recipe on files (any size, read per sample) or on arrays of another size; never for
    size × size arrays, whose graph stays as it was (no resampling pass)."""
    if recipe != "cifar":
        return False
    images = getattr(dataset, "images", None)
    return image_storage(dataset) != "arrays" or tuple(images.shape[1:3]) != (size, size)


@do_not_convert
def fit(img, size: int):
    """The CIFAR recipe's first step: the whole image resized to size × size (bilinear,
    antialiased when shrinking, aspect ratio not kept, as the torch backend's PIL resize); an image
    already that size passes unchanged. The source draws the views for this size."""
    return resize_full(img, size)


@do_not_convert
def crop_resize(img, window, size: int):
    """Resize the window (y0, x0, y1, x1) of ``img`` to size × size: RandomResizedCrop's crop,
    resize and — where x0 > x1 — horizontal flip. As PIL's bilinear ``resize`` (torchvision's
    on PIL images): antialiased (the triangle filter widened by the scale) when shrinking, the
    width first, rounded to uint8, then the height; two DALI passes, so that the intermediate
    rounding is PIL's too (one pass differs from PIL by 0.2 grey levels on average, two by
    about 0.03)."""
    rows = dmath.abs(window[2] - window[0])
    wide = fn.resize(img, resize_x=float(size), resize_y=rows, roi_start=window[0:2], roi_end=window[2:4],
                     roi_relative=False, antialias=True, interp_type=types.INTERP_LINEAR)
    return fn.resize(wide, size=[size, size], antialias=True, interp_type=types.INTERP_LINEAR)


@do_not_convert
def pad_crop(img, window, size: int):
    """RandomCrop(size, padding 4): the window may start at a negative offset; outside is zero."""
    return fn.slice(img, start=fn.cast(window[0:2], dtype=types.INT32), shape=[size, size], axis_names="HW",
                    out_of_bounds_policy="pad", fill_values=0)


@do_not_convert
def resize_full(img, size: int):
    """The whole image to size × size as PIL's bilinear ``resize`` (width pass, then height)."""
    rows = fn.cast(img.shape(dtype=types.INT32)[0], dtype=types.FLOAT)
    wide = fn.resize(img, resize_x=float(size), resize_y=rows, antialias=True, interp_type=types.INTERP_LINEAR)
    return fn.resize(wide, size=[size, size], antialias=True, interp_type=types.INTERP_LINEAR)


def jitter(img, params):
    """ColorJitter (torchvision's, in the drawn order) and RandomGrayscale at the drawn
    parameters (``dali_augment.colour_jitter``); all steps "none": the image as it is."""
    return dali_augment.colour_jitter(img, params)


@do_not_convert
def flip(img, flag):
    return fn.flip(img, horizontal=flag)


def blur(img, taps):
    """PIL's GaussianBlur where the source drew one (taps of its box passes; all zero: none)."""
    return dali_augment.pil_gaussian_blur(img, taps)


def keyed_augment(img, graph: AugmentGraph, kinds, interps, params):
    """View 0's RandAugment / CIFAR10Policy stages, as drawn per sample by the source."""
    return dali_augment.apply_stages(img, kinds, interps, params, stages=graph.stages, fill=graph.fill,
                                     size=graph.size)


@do_not_convert
def normalize(img, mean: Sequence[float], std: Sequence[float], layout: str = "CHW", half: bool = False):
    """uint8 HWC -> (x/255 − mean)/std as float32 (float16 with ``half``), CHW or HWC."""
    return fn.crop_mirror_normalize(img, dtype=types.FLOAT16 if half else types.FLOAT, output_layout=layout,
                                    mean=[255.0 * m for m in mean], std=[255.0 * s for s in std])
