"""The pipeline contract (ARCHITECTURE §3): one typed training batch whatever the backend,
and the one description of a pipeline that every backend is built from.

Every backend (DALI on GPU, DALI on CPU, torch DataLoader) yields :class:`TrainBatch`
objects for :class:`TrainPipelineSpec`; the trainer depends on nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Sequence

import torch
from torch import Tensor

from .randaugment import check_randaugment

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "INAT_MEAN", "INAT_STD", "CIFAR_MEAN", "CIFAR_STD", "RECIPES",
           "ON_ERROR", "TrainBatch", "TrainPipelineSpec", "ValPipelineSpec"]

# Normalisation constants of ARCHITECTURE §2.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INAT_MEAN = (0.466, 0.471, 0.380)
INAT_STD = (0.195, 0.194, 0.192)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)

#: "imagenet": RandomResizedCrop views from JPEG lists (ImageNet-LT, iNat, Places, synthetic);
#: "cifar": 32 px arrays with pad-crop + AutoAugment for view 0 (ARCHITECTURE §1 "Views").
RECIPES = ("imagenet", "cifar")
ON_ERROR = ("raise", "skip")


@dataclass
class TrainBatch:
    """One training step's data, per rank.

    Attributes:
        image: (B, 3, H, W) float classification input, normalised; CutMix already applied
            where ``mixed`` is set.
        view1, view2: (B, 3, H, W) the two contrastive ("sim") views of the background images.
        label_a: (B,) int64 background class.
        label_b: (B,) int64 foreground class (equal to ``label_a`` where not mixed).
        lam: (B,) float32 weight of ``label_a`` in the area label, 1 − box area/(H·W)
            (1.0 where not mixed).
        mixed: (B,) bool, whether a CutMix box was pasted into the sample.
        foreground: diagnostic only, None unless the spec asks for it
            (``extra["with_foreground"]``): (B, 3, H, W) the foreground view 0 before pasting,
            so tests can check the pasted region pixel for pixel.
    """

    image: Tensor
    view1: Tensor
    view2: Tensor
    label_a: Tensor
    label_b: Tensor
    lam: Tensor
    mixed: Tensor
    foreground: Tensor | None = None

    def __len__(self) -> int:
        return self.label_a.shape[0]

    def to(self, device, non_blocking: bool = True, memory_format: torch.memory_format | None = None) -> "TrainBatch":
        """Move every tensor to ``device``; image tensors optionally to ``memory_format``."""
        out = {}
        for f in fields(self):
            t = getattr(self, f.name)
            if t is None:
                out[f.name] = None
                continue
            t = t.to(device, non_blocking=non_blocking)
            if memory_format is not None and t.dim() == 4:
                t = t.contiguous(memory_format=memory_format)
            out[f.name] = t
        return TrainBatch(**out)

    def validate(self) -> None:
        """Raise ValueError if the tensors do not fit the contract (used by tests and backends)."""
        b = len(self)
        for name in ("image", "view1", "view2") + (("foreground",) if self.foreground is not None else ()):
            t = getattr(self, name)
            if t.dim() != 4 or t.shape[0] != b or t.shape[1] != 3 or not t.is_floating_point():
                raise ValueError(f"TrainBatch.{name}: expected float (B={b}, 3, H, W); got {tuple(t.shape)} {t.dtype}")
        for name, dtype in (("label_a", torch.int64), ("label_b", torch.int64), ("lam", torch.float32),
                            ("mixed", torch.bool)):
            t = getattr(self, name)
            if t.shape != (b,) or t.dtype != dtype:
                raise ValueError(f"TrainBatch.{name}: expected ({b},) {dtype}; got {tuple(t.shape)} {t.dtype}")


@dataclass(kw_only=True)
class TrainPipelineSpec:
    """Everything a backend needs to produce the training batches of one rank."""

    dataset: Any
    """A ``fastlt.data.LongTailedList`` (recipe "imagenet") or an array dataset with ``images``
    (N, 32, 32, 3) uint8 and ``labels`` (recipe "cifar")."""
    recipe: str = "imagenet"
    """Augmentation recipe, one of RECIPES (ARCHITECTURE §1 "Views")."""
    image_size: int = 224
    """Side of the square training views."""
    batch_size: int = 256
    """Per-rank batch size; incomplete last batches are dropped."""
    background_sampler: str = "uniform"
    """Sampler kind of the background (canvas) stream (fastlt.sampling)."""
    foreground_sampler: str = "balanced"
    """Sampler kind of the foreground (patch) stream (fastlt.sampling)."""
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
    extra: dict = field(default_factory=dict)
    """Backend-specific options (documented by each backend)."""

    def __post_init__(self):
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
