"""What a pipeline is asked for (docs/design.md §3, pipeline contract): the ``pipeline`` config
section, the option lists of the data path, the normalisation constants, and the one
description of a training / validation pipeline that every backend is built from.

No torch and no DALI here: ``fastlt.config.loader`` imports these lists and the trainer, ``fastlt
eval`` and the benchmarks build their specs with :func:`train_spec` / :func:`val_spec`.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Sequence

from fastlt.errors import ConfigError
from fastlt.config.typed import one_of, positive

from .randaugment import check_randaugment

__all__ = ["CIFAR_MEAN", "CIFAR_STD", "EXTRA_KEYS", "IMAGE_DTYPES", "IMAGENET_MEAN", "IMAGENET_STD", "INAT_MEAN",
           "DEFAULT_MAX_IMAGE_PIXELS", "INAT_STD", "MEMORY_FORMATS", "NORMALIZATIONS", "ON_ERROR", "PIPELINE_BACKENDS", "PipelineConfig", "RECIPES", "TrainPipelineSpec",
           "ValPipelineSpec", "check_extra", "normalization", "train_spec", "val_spec"]

# Normalisation constants of docs/design.md §2.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INAT_MEAN = (0.466, 0.471, 0.380)
INAT_STD = (0.195, 0.194, 0.192)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
#: ``data.normalization`` name -> (mean, std).
NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "inat": (INAT_MEAN, INAT_STD),
                  "cifar": (CIFAR_MEAN, CIFAR_STD)}

#: "imagenet": RandomResizedCrop views from image files (ImageNet-LT, iNat, Places, synthetic);
#: "cifar": small images — CIFAR arrays, or files resized to image_size first where they are not
#: that size — with pad-crop + the reference's CIFAR10Policy for view 0 (docs/design.md §1 "Views").
RECIPES = ("imagenet", "cifar")
#: A missing or corrupt image: "raise" names the file; "skip" substitutes another image of its class.
ON_ERROR = ("raise", "skip")
#: ``data.max_image_pixels`` by default: 8192 × 8192. A decoded RGB image of that size is 192 MiB;
#: a file whose header claims more is refused before decoding (a 48 KB PNG can claim 20000 × 20000).
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192
#: ``pipeline.backend``: "auto" (DALI when it imports, else torch), "dali" or "torch".
PIPELINE_BACKENDS = ("auto", "dali", "torch")

#: Memory formats and dtypes a pipeline can deliver the images in (the model's first layer's).
MEMORY_FORMATS = ("contiguous", "channels_last")
IMAGE_DTYPES = ("float32", "bfloat16", "float16")

#: ``pipeline.extra`` keys understood by some backend; both backends accept all of them, so
#: switching ``pipeline.backend`` never breaks a config.
EXTRA_KEYS = {
    "with_foreground": "add the pre-paste foreground view to each batch (tests, diagnostics)",
    "prefetch_factor": "torch: steps each DataLoader worker prepares ahead (default 2)",
    "py_num_workers": "dali: Python reader processes (default 1 on CPU, max(2, num_workers // 2) on GPU)",
    "prefetch_queue_depth": "dali: batches prepared ahead (default 2)",
    "py_start_method": "dali: 'fork' or 'spawn' for the reader processes (default fork on CPU, spawn on GPU)",
}


def normalization(name: str) -> tuple[tuple, tuple]:
    """(mean, std) of a ``data.normalization`` name."""
    one_of("data.normalization", name, tuple(NORMALIZATIONS))
    return NORMALIZATIONS[name]


def check_extra(extra: dict) -> None:
    """Reject misspelled ``pipeline.extra`` keys instead of silently ignoring them."""
    unknown = sorted(set(extra) - set(EXTRA_KEYS))
    if unknown:
        hints = "; ".join(f"{k!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(k, EXTRA_KEYS, 1))
                          else repr(k) for k in unknown)
        allowed = "; ".join(f"{k}: {v}" for k, v in EXTRA_KEYS.items())
        raise ValueError(f"pipeline.extra has unknown key(s) {hints}. Allowed: {allowed}")
    method = extra.get("py_start_method")
    if method is not None and method not in ("fork", "spawn"):
        raise ValueError(f"pipeline.extra.py_start_method must be 'fork' or 'spawn'; got {method!r}")


@dataclass(kw_only=True)
class PipelineConfig:
    """Which data pipeline backend produces the batches (docs/design.md §3, pipeline contract)."""

    backend: str = "auto"
    """auto (DALI when it imports, else torch), torch or dali; an explicit request that cannot be met is an error."""
    num_workers: int = 4
    """Decoding/augmentation worker processes (or threads, for DALI) per rank."""
    extra: dict = field(default_factory=dict)
    """Backend-specific options, passed through to the pipeline spec."""

    def __post_init__(self):
        one_of("pipeline.backend", self.backend, PIPELINE_BACKENDS)
        positive("pipeline.num_workers", self.num_workers, allow_zero=True)
        try:
            check_extra(self.extra)
        except ValueError as e:
            raise ConfigError(str(e)) from None


@dataclass(kw_only=True)
class TrainPipelineSpec:
    """Everything a backend needs to produce the training batches of one rank."""

    dataset: Any
    """Encoded files with ``read_bytes(i)`` (``fastlt.data.LongTailedList`` or an image-folder
    dataset of the same interface; either recipe) or in-memory ``images`` uint8 (N, H, W, 3)
    (``fastlt.data.ArrayDataset``; recipe "cifar"), with ``labels``. Under recipe "cifar" an
    image that is not image_size × image_size is resized to it first (bilinear, aspect not kept)."""
    recipe: str = "imagenet"
    """Augmentation recipe, one of RECIPES (docs/design.md §1 "Views")."""
    image_size: int = 224
    """Side of the square training views."""
    batch_size: int = 256
    """Per-rank batch size; incomplete last batches are dropped."""
    background_sampler: str = "uniform"
    """Sampler kind of the background (canvas) stream (fastlt.method.sampling)."""
    foreground_sampler: str = "balanced"
    """Sampler kind of the foreground (patch) stream (fastlt.method.sampling)."""
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    cutmix_prob: float = 0.5
    cutmix_per_sample: bool = False
    """False: one coin and one box per batch (reference behaviour); True: per sample."""
    cutmix_alpha: float = 1.0
    augment: bool = True
    """False is the deterministic test mode: resize only, no random crop/flip/colour."""
    randaugment: bool = True
    """View 0's automatic augmentation: timm RandAugment (imagenet recipe; ``randaugment_*``
    below) or the reference's CIFAR10Policy (cifar recipe). False: none."""
    randaugment_n: int = 2
    """RandAugment ops per image (timm's ``n``; the reference's ``--randaug_n``), imagenet recipe."""
    randaugment_m: int = 10
    """RandAugment magnitude on timm's 0–10 scale (10 = full strength: rotate ±30°, shear ±0.3,
    translate ±45 %; the reference's ``--randaug_m``), imagenet recipe."""
    randaugment_mstd: float = 0.5
    """Standard deviation of the per-op magnitude noise, N(m, mstd) clipped to [0, 10]
    (timm's ``mstd``; > 100 means uniform in [0, m]), imagenet recipe."""
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    num_workers: int = 2
    device: str = "cpu"
    """"cpu" or "cuda": where the batches are produced/delivered."""
    on_error: str = "raise"
    """Corrupt/missing image: "raise" names the file; "skip" substitutes another image of the same class."""
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    """An encoded image whose header claims more pixels is a bad image (under ``on_error``), never decoded."""
    memory_format: str = "contiguous"
    """Layout of ``TrainBatch.images``: "contiguous" (NCHW) or "channels_last" (NHWC storage)."""
    dtype: str = "float32"
    """dtype of ``TrainBatch.images``: float32, or bfloat16 / float16 for models that hold
    low-precision weights (DeepSpeed's bf16/fp16 mode)."""
    extra: dict = field(default_factory=dict)
    """Backend-specific options (EXTRA_KEYS, documented by each backend)."""

    def __post_init__(self):
        if self.memory_format not in MEMORY_FORMATS:
            raise ValueError(f"memory_format must be one of {MEMORY_FORMATS}; got {self.memory_format!r}")
        if self.dtype not in IMAGE_DTYPES:
            raise ValueError(f"dtype must be one of {IMAGE_DTYPES}; got {self.dtype!r}")
        if self.recipe not in RECIPES:
            raise ValueError(f"pipeline recipe must be one of {RECIPES}; got {self.recipe!r}")
        if self.on_error not in ON_ERROR:
            raise ValueError(f"data.on_error must be one of {ON_ERROR}; got {self.on_error!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {self.batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}); got {self.rank}")
        if not 0.0 <= self.cutmix_prob <= 1.0:
            raise ValueError(f"cutmix_prob must be in [0, 1]; got {self.cutmix_prob}")
        check_randaugment(self.randaugment_n, self.randaugment_m, self.randaugment_mstd)


@dataclass(kw_only=True)
class ValPipelineSpec:
    """Validation: resize shorter side to 256/224·size and centre-crop (imagenet), CIFAR as is."""

    dataset: Any
    recipe: str = "imagenet"
    image_size: int = 224
    batch_size: int = 256
    rank: int = 0
    world_size: int = 1
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    num_workers: int = 2
    device: str = "cpu"
    on_error: str = "raise"
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS


def train_spec(cfg, dataset, *, batch_size: int, rank: int = 0, world_size: int = 1,
               device: str = "cpu") -> TrainPipelineSpec:
    """The training pipeline spec of a :class:`fastlt.config.loader.Config` for one rank (``batch_size`` per
    rank), delivering the images in the layout and dtype the model's first layer takes."""
    d, m, ds = cfg.data, cfg.method, cfg.deepspeed
    mean, std = normalization(d.normalization)
    dtype = ({"bf16": "bfloat16", "fp16": "float16"}[ds.precision] if ds.low_precision_weights else "float32")
    return TrainPipelineSpec(
        memory_format="channels_last" if cfg.model.channels_last else "contiguous", dtype=dtype,
        dataset=dataset, recipe=d.augment_recipe, image_size=d.image_size, batch_size=batch_size,
        background_sampler=d.background_sampler, foreground_sampler=d.foreground_sampler, seed=cfg.run.seed,
        rank=rank, world_size=world_size, cutmix_prob=m.cutmix_prob, cutmix_per_sample=m.cutmix_per_sample,
        cutmix_alpha=m.cutmix_alpha, randaugment=d.randaugment, randaugment_n=d.randaugment_n,
        randaugment_m=d.randaugment_m, randaugment_mstd=d.randaugment_mstd, mean=mean, std=std,
        num_workers=cfg.pipeline.num_workers, device=device, on_error=d.on_error, max_image_pixels=d.max_image_pixels,
        extra=dict(cfg.pipeline.extra))


def val_spec(cfg, dataset, *, rank: int = 0, world_size: int = 1, device: str = "cpu") -> ValPipelineSpec:
    """The validation pipeline spec of a :class:`fastlt.config.loader.Config` for one rank."""
    d = cfg.data
    mean, std = normalization(d.normalization)
    return ValPipelineSpec(dataset=dataset, recipe=d.augment_recipe, image_size=d.image_size,
                           batch_size=d.eval_batch_size, rank=rank, world_size=world_size, mean=mean, std=std,
                           num_workers=cfg.pipeline.num_workers, device=device, on_error=d.on_error,
                           max_image_pixels=d.max_image_pixels)
