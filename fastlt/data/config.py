"""The ``data`` section of the config (datasets, views, batch size, samplers; docs/design.md §1,
§2) and the dataset kinds. The option lists come from the modules that own them: dataset
profiles and CIFAR names from ``fastlt.data``, samplers from ``fastlt.method.sampling``, view recipes,
normalisations and the bad-input policy from ``fastlt.pipelines.spec``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fastlt.errors import ConfigError
from fastlt.pipelines.randaugment import check_randaugment
from fastlt.pipelines.spec import DEFAULT_MAX_IMAGE_PIXELS, NORMALIZATIONS, ON_ERROR, RECIPES
from fastlt.method.sampling import SAMPLER_KINDS
from fastlt.config.typed import check_path, one_of, positive

from .cifar import CIFAR_NAMES
from .profile import IMB_TYPES
from .synthetic import MAX_SYNTHETIC_CLASSES

__all__ = ["DATA_KINDS", "DataConfig", "MAX_CLASSES", "SyntheticConfig"]

#: The most classes fastlt takes (iNaturalist 2018 has 8142, iNaturalist 2021 10 000).
MAX_CLASSES = 2**24

#: Where the images come from: list files, CIFAR pickle batches, the generated synthetic set, or
#: class sub-folders (fastlt.data.folder).
DATA_KINDS = ("list", "cifar", "synthetic", "folder")


@dataclass(kw_only=True)
class SyntheticConfig:
    """The synthetic long-tailed JPEG dataset (fastlt.data.make_synthetic_lt), cached on disk."""

    num_classes: int = 20
    """Number of classes (shape × colour), at most 144."""
    imb_factor: float = 0.02
    """n_min / n_max of the exponential profile (0.01 is "IF 100")."""
    n_max: int = 250
    """Training images of the largest class."""
    image_size: int = 40
    """Side of the generated JPEGs in pixels."""
    n_val: int = 20
    """Validation images per class (balanced)."""
    seed: int = 0
    """Seed of the generator (the dataset is a pure function of these parameters)."""

    def __post_init__(self):
        positive("data.synthetic.num_classes", self.num_classes)
        if self.num_classes > MAX_SYNTHETIC_CLASSES:
            raise ConfigError(f"data.synthetic.num_classes: at most {MAX_SYNTHETIC_CLASSES} (12 shapes × 12 colours); "
                              f"got {self.num_classes}")
        if not 0 < self.imb_factor <= 1:
            raise ConfigError(f"data.synthetic.imb_factor: must be in (0, 1] (n_min / n_max); got {self.imb_factor!r}")
        positive("data.synthetic.n_max", self.n_max)
        if self.image_size < 8:
            raise ConfigError(f"data.synthetic.image_size: must be >= 8; got {self.image_size!r}")
        positive("data.synthetic.n_val", self.n_val)
        positive("data.synthetic.seed", self.seed, allow_zero=True)


@dataclass(kw_only=True)
class DataConfig:
    """Where the images come from and how they are turned into batches (docs/design.md §1, §2)."""

    kind: str = "list"
    """"list" (ImageNet-LT / iNat18 / Places-LT list files), "cifar" (CIFAR-LT from the python
    pickle batches), "synthetic" (generated once and cached under data.root) or "folder" (one
    sub-folder per class under data.root/data.train_dir, class index by sorted folder name)."""
    root: str = ""
    """Dataset root: list paths are relative to it; the folder holding cifar-10-batches-py /
    cifar-100-python; or the cache folder of the synthetic dataset. Relative paths are
    resolved against the working directory."""
    train_list: str = ""
    """Training list file (kind "list"), relative to data.root unless absolute."""
    val_list: str = ""
    """Validation list file (kind "list"), evaluated every run.eval_every epochs."""
    test_list: str = ""
    """Optional test list file (kind "list"), used by `fastlt eval --split test`."""
    train_dir: str = "train"
    """Training image folder (kind "folder"), relative to data.root unless absolute; one sub-folder per class."""
    val_dir: str = "val"
    """Validation image folder (kind "folder"); its class folders must be among the training ones."""
    test_dir: str = ""
    """Optional test image folder (kind "folder"), used by `fastlt eval --split test`."""
    class_names: str = ""
    """Optional text file naming the classes of a list dataset, one name per line in index
    order (relative to data.root unless absolute); folder datasets take the folder names."""
    num_classes: int = 0
    """C. Must match the dataset: training labels must lie in [0, C) and every class needs a
    training image. 0 = take it from the dataset (synthetic and CIFAR only)."""
    cifar: str = "cifar100"
    """cifar10 or cifar100 (kind "cifar")."""
    imb_factor: float = 0.01
    """n_min / n_max of the CIFAR-LT profile (0.01 = IF 100, 0.02 = IF 50, 0.1 = IF 10)."""
    imb_type: str = "exp"
    """CIFAR-LT profile: exp or step (docs/design.md §2)."""
    cifar_subset_seed: int = 10
    """Seed of the per-class shuffle that picks which CIFAR images the long-tailed subset keeps
    (kind "cifar"). 10 is ConCutMix's (its dataset/cifar.py); LDAM-DRW and BCL use 0. Only the
    subset: run.seed seeds everything else."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """Parameters of the synthetic dataset (kind "synthetic")."""
    augment_recipe: str = "imagenet"
    """View recipe of docs/design.md §1: imagenet (RandomResizedCrop + RandAugment / sim views)
    or cifar (pad-crop + CIFAR10Policy / RandomResizedCrop + blur), the latter for small images of
    any data.kind: images that are not image_size × image_size are resized to it first."""
    image_size: int = 224
    """Side of the square training and evaluation views."""
    normalization: str = "imagenet"
    """Mean/std of docs/design.md §2: imagenet, inat or cifar."""
    batch_size: int = 256
    """Global batch per micro-step over all ranks (split evenly); the optimizer sees
    batch_size × deepspeed.grad_accum_steps images per step."""
    eval_batch_size: int = 256
    """Per-rank batch size for evaluation."""
    background_sampler: str = "uniform"
    """Background (canvas) stream: uniform, balanced, reverse or sqrt."""
    foreground_sampler: str = "balanced"
    """Foreground (patch) stream: balanced, reverse, uniform or sqrt."""
    randaugment: bool = True
    """The classification view's automatic augmentation: timm's RandAugment with the reference's
    'rand-n2-m10-mstd0.5' (imagenet recipe) or the reference's CIFAR10Policy (cifar recipe)."""
    randaugment_n: int = 2
    """RandAugment ops per image (the reference's --randaug_n)."""
    randaugment_m: int = 10
    """RandAugment magnitude on timm's 0–10 scale; 10 is full strength (rotate ±30°, shear ±0.3,
    translate ±45 %), the reference's --randaug_m."""
    randaugment_mstd: float = 0.5
    """Standard deviation of the per-op magnitude, N(m, mstd) clipped to [0, 10] (timm's mstd)."""
    on_error: str = "raise"
    """A missing or corrupt image: raise (name the file) or skip (use another image of its class)."""
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    """Largest image (width × height, read from the file's header before decoding) taken; a file
    claiming more is a bad image under data.on_error. 8192 × 8192 by default: a small PNG can
    claim 20000 × 20000 pixels and take gigabytes to decode."""

    def __post_init__(self):
        one_of("data.kind", self.kind, DATA_KINDS)
        for key in ("root", "train_list", "val_list", "test_list", "train_dir", "val_dir", "test_dir", "class_names"):
            check_path(f"data.{key}", getattr(self, key))
        one_of("data.cifar", self.cifar, CIFAR_NAMES)
        one_of("data.imb_type", self.imb_type, IMB_TYPES)
        one_of("data.augment_recipe", self.augment_recipe, RECIPES)
        one_of("data.normalization", self.normalization, tuple(NORMALIZATIONS))
        one_of("data.background_sampler", self.background_sampler, SAMPLER_KINDS)
        one_of("data.foreground_sampler", self.foreground_sampler, SAMPLER_KINDS)
        one_of("data.on_error", self.on_error, ON_ERROR)
        positive("data.num_classes", self.num_classes, allow_zero=True)
        positive("data.max_image_pixels", self.max_image_pixels)
        positive("data.cifar_subset_seed", self.cifar_subset_seed, allow_zero=True)
        if self.num_classes > MAX_CLASSES:
            raise ConfigError(f"data.num_classes: at most {MAX_CLASSES} (the class counts, the classifier and the "
                              f"prior hold one entry per class); got {self.num_classes}")
        if self.num_classes == 1:
            raise ConfigError("data.num_classes: must be >= 2 (or 0 to take it from the dataset); got 1")
        if not 0 < self.imb_factor <= 1:
            raise ConfigError(f"data.imb_factor: must be in (0, 1] (n_min / n_max); got {self.imb_factor!r}")
        if self.image_size < 8:
            raise ConfigError(f"data.image_size: must be >= 8; got {self.image_size!r}")
        try:
            check_randaugment(self.randaugment_n, self.randaugment_m, self.randaugment_mstd)
        except ValueError as e:
            raise ConfigError(f"data.{e}") from None
        positive("data.batch_size", self.batch_size)
        positive("data.eval_batch_size", self.eval_batch_size)
        if self.kind == "list":
            for key in ("root", "train_list", "val_list"):
                if not getattr(self, key):
                    raise ConfigError(f"data.{key}: required when data.kind is 'list'. Example: "
                                      "--set data.root=/datasets/ImageNet --set data.train_list=ImageNet_LT_train.txt "
                                      "--set data.val_list=ImageNet_LT_val.txt")
            if self.num_classes == 0:
                raise ConfigError("data.num_classes: required when data.kind is 'list' (e.g. 1000 for ImageNet-LT, "
                                  "8142 for iNaturalist 2018, 365 for Places-LT)")
        if self.kind == "folder" and not (self.root and self.train_dir and self.val_dir):
            raise ConfigError("data.root, data.train_dir and data.val_dir: required when data.kind is 'folder'. "
                              "Example: --set data.root=/datasets/birds (holding train/<class>/*.jpg and "
                              "val/<class>/*.jpg)")
        if self.class_names and self.kind != "list":
            raise ConfigError(f"data.class_names: only list datasets take a class-name file; data.kind is "
                              f"{self.kind!r} (folder datasets are named by their folders). Remove data.class_names")
        if self.kind in ("cifar", "synthetic") and not self.root:
            raise ConfigError(f"data.root: required when data.kind is {self.kind!r}; "
                              + ("the folder that holds cifar-10-batches-py / cifar-100-python"
                                 if self.kind == "cifar" else "a cache folder such as data_cache/synthetic"))

    def path(self, name: str) -> Path:
        """A list file resolved against data.root (absolute paths are kept)."""
        p = Path(getattr(self, name))
        return p if p.is_absolute() else Path(self.root) / p

    @property
    def num_classes_known(self) -> int:
        """C as far as the config alone knows it (0 if it must come from the dataset)."""
        if self.num_classes:
            return self.num_classes
        if self.kind == "synthetic":
            return self.synthetic.num_classes
        if self.kind == "cifar":
            return 10 if self.cifar == "cifar10" else 100
        return 0
