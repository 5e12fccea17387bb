"""The augmentation recipes of ARCHITECTURE §1 "Views" as torchvision (v2) transforms, for
the torch DataLoader backend; the DALI graphs in ``dali_train.py`` implement the same
recipes with DALI operators.

ImageNet-style recipe (ImageNet-LT, iNaturalist, Places-LT, the synthetic set):
- view 0 (classification, also the foreground's one view): RandomResizedCrop(size), flip,
  ColorJitter(0.4, 0.4, 0.4, 0) with p = 1, RandAugment n=2 m=10;
- views 1, 2 ("sim", contrastive): RandomResizedCrop(size), flip,
  ColorJitter(0.4, 0.4, 0.4, 0.1) with p = 0.8, grayscale with p = 0.2.
CIFAR recipe (32 px arrays): view 0 RandomCrop(32, padding 4) + flip + AutoAugment (CIFAR-10
policy); views 1, 2 RandomResizedCrop(32, scale 0.2–1) + flip + jitter p = 0.8 + grayscale
p = 0.2 + GaussianBlur p = 0.5.

``augment=False`` is the deterministic test mode: every view is the image resized to
size × size (no crop, flip or colour change), so tests can predict the pixels.

Transforms output float CHW tensors, normalised with the recipe's mean/std. Randomness comes
from torch's global generator, which the loader seeds per sample from a key (see
``torch_loader``), so results do not depend on worker scheduling.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torchvision.transforms import v2 as T

__all__ = ["train_view_transforms", "val_transform", "RANDAUG_FILL", "val_resize_size"]

#: Fill value of the geometric RandAugment/AutoAugment ops (DALI's auto_aug default, 128).
RANDAUG_FILL = 128
#: Gaussian blur of the CIFAR sim views: 3×3 kernel, σ ~ U(0.1, 2.0) (SimCLR's σ range).
CIFAR_BLUR_KERNEL = 3
BLUR_SIGMA = (0.1, 2.0)


def _finish(mean: Sequence[float], std: Sequence[float]) -> list:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))]


def train_view_transforms(recipe: str, size: int, mean: Sequence[float], std: Sequence[float], *,
                          augment: bool = True, randaugment: bool = True):
    """(view0, sim) transforms of a recipe: view 0 is used for the background's classification
    view and the foreground view; ``sim`` for the two contrastive views. Inputs are PIL images."""
    if not augment:
        plain = T.Compose([T.Resize((size, size), antialias=True), *_finish(mean, std)])
        return plain, plain
    if recipe == "imagenet":
        view0 = [T.RandomResizedCrop(size, antialias=True), T.RandomHorizontalFlip(),
                 T.ColorJitter(0.4, 0.4, 0.4, 0.0)]
        if randaugment:
            view0.append(T.RandAugment(num_ops=2, magnitude=10, fill=RANDAUG_FILL))
        sim = [T.RandomResizedCrop(size, antialias=True), T.RandomHorizontalFlip(),
               T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2)]
    elif recipe == "cifar":
        view0 = [T.RandomCrop(size, padding=4), T.RandomHorizontalFlip()]
        if randaugment:
            view0.append(T.AutoAugment(T.AutoAugmentPolicy.CIFAR10, fill=RANDAUG_FILL))
        sim = [T.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True), T.RandomHorizontalFlip(),
               T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
               T.RandomApply([T.GaussianBlur(CIFAR_BLUR_KERNEL, BLUR_SIGMA)], p=0.5)]
    else:
        raise ValueError(f"unknown recipe {recipe!r}; expected 'imagenet' or 'cifar'")
    return T.Compose(view0 + _finish(mean, std)), T.Compose(sim + _finish(mean, std))


def val_resize_size(size: int) -> int:
    """Shorter side before the centre crop: 256 for 224, i.e. round(size · 256/224)."""
    return int(round(size * 256 / 224))


def val_transform(recipe: str, size: int, mean: Sequence[float], std: Sequence[float]):
    """Validation: resize the shorter side to 256/224·size and centre-crop size (imagenet);
    CIFAR images are used as they are (resized only if ``size`` is not their size)."""
    if recipe == "imagenet":
        return T.Compose([T.Resize(val_resize_size(size), antialias=True), T.CenterCrop(size), *_finish(mean, std)])
    if recipe == "cifar":
        return T.Compose([T.Resize((size, size), antialias=True), *_finish(mean, std)])
    raise ValueError(f"unknown recipe {recipe!r}; expected 'imagenet' or 'cifar'")
