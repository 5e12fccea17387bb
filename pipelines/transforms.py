"""The augmentation recipes of docs/design.md §1 "Views" as the reference composes them, with
torchvision (v2) transforms drawing their own random numbers (:func:`train_view_transforms`), and
the validation transform of the torch backend.

The training pipelines do not run :func:`train_view_transforms`: both backends take their
views' parameters from one keyed draw (``view_draw``) with these transforms' distributions, the
torch backend applying them with the same torchvision / timm / PIL functions (``torch_views``),
the DALI graph with its operators. These transforms are what that draw reproduces, e.g. for a
user's own torchvision pipeline.

ImageNet-style recipe (ImageNet-LT, iNaturalist, Places-LT, the synthetic set):
- view 0 (classification, also the foreground's one view): RandomResizedCrop(size), flip,
  ColorJitter(0.4, 0.4, 0.4, 0) with p = 1, then timm's own RandAugment as the reference
  configures it (``randaugment.torch_randaugment``: 'rand-n2-m10-mstd0.5', mean-colour fill);
- views 1, 2 ("sim", contrastive): RandomResizedCrop(size), flip,
  ColorJitter(0.4, 0.4, 0.4, 0.1) with p = 0.8, grayscale with p = 0.2.
CIFAR recipe (small images: arrays or files, resized to size × size first by the loader where
they are not that size): view 0 RandomCrop(32, padding 4) + flip + the reference's
CIFAR10Policy (``cifar_policy``); views 1, 2 RandomResizedCrop(32, scale 0.2–1) + flip + jitter
p = 0.8 + grayscale p = 0.2 + PIL's GaussianBlur(radius σ ~ U(0.1, 2)) with p = 0.5.

``augment=False`` is the deterministic test mode: every view is the image resized to
size × size (no crop, flip or colour change), so tests can predict the pixels.

Transforms output float CHW tensors, normalised with the recipe's mean/std. Randomness comes
from torch's global generator; timm's RandAugment and the CIFAR policy draw from generators
seeded from it.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torchvision.transforms import v2 as T

from .cifar_policy import TorchCIFAR10Policy
from .randaugment import torch_randaugment

__all__ = ["PILGaussianBlur", "finish_transform", "train_view_transforms", "val_transform", "val_resize_size"]

#: The CIFAR sim views' blur: σ ~ U(0.1, 2.0) with probability 0.5 (the reference's SimCLR blur).
BLUR_SIGMA = (0.1, 2.0)
BLUR_P = 0.5


class PILGaussianBlur:
    """The reference's ``GaussianBlur``: with probability ``p``, PIL's
    ``ImageFilter.GaussianBlur(radius=σ)``, σ ~ U(sigma); coin and σ from torch's generator."""

    def __init__(self, sigma: Sequence[float] = BLUR_SIGMA, p: float = BLUR_P):
        self.sigma, self.p = (float(sigma[0]), float(sigma[1])), float(p)

    def __call__(self, img):
        from PIL import ImageFilter

        if float(torch.rand(())) >= self.p:
            return img
        lo, hi = self.sigma
        sigma = lo + (hi - lo) * float(torch.rand(()))
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma}, p={self.p})"


def _finish(mean: Sequence[float], std: Sequence[float]) -> list:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))]


def finish_transform(mean: Sequence[float], std: Sequence[float]):
    """RGB PIL image -> float32 CHW tensor (x/255 − mean)/std: the last step of every view."""
    return T.Compose(_finish(mean, std))


def train_view_transforms(recipe: str, size: int, mean: Sequence[float], std: Sequence[float], *,
                          augment: bool = True, randaugment: bool = True, randaugment_n: int = 2,
                          randaugment_m: int = 10, randaugment_mstd: float = 0.5):
    """(view0, sim) transforms of a recipe: view 0 is used for the background's classification
    view and the foreground view; ``sim`` for the two contrastive views. Inputs are PIL images.
    ``randaugment_*`` set timm's RandAugment (imagenet recipe); the CIFAR policy has none."""
    if not augment:
        plain = T.Compose([T.Resize((size, size), antialias=True), *_finish(mean, std)])
        return plain, plain
    if recipe == "imagenet":
        view0 = [T.RandomResizedCrop(size, antialias=True), T.RandomHorizontalFlip(),
                 T.ColorJitter(0.4, 0.4, 0.4, 0.0)]
        if randaugment:
            view0.append(torch_randaugment(size, mean, randaugment_n, randaugment_m, randaugment_mstd))
        sim = [T.RandomResizedCrop(size, antialias=True), T.RandomHorizontalFlip(),
               T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2)]
    elif recipe == "cifar":
        view0 = [T.RandomCrop(size, padding=4), T.RandomHorizontalFlip()]
        if randaugment:
            view0.append(TorchCIFAR10Policy())
        sim = [T.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True), T.RandomHorizontalFlip(),
               T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
               PILGaussianBlur()]
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
