"""The ``model`` section of the config and the backbone names (docs/design.md §1, "Model (BCL)").

Kept free of torch so that loading a config does not import it; the modules that build the
networks are ``fastlt.models.bcl`` and ``fastlt.models.cifar_resnet``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from fastlt.errors import ConfigError
from fastlt.config.typed import check_path, one_of, positive

__all__ = ["BACKBONES", "PRETRAINED_SCOPES", "TIMM_BACKBONES", "ModelConfig", "check_input_size"]

#: The timm backbones of the shipped recipes (tested one by one); ``model.backbone`` takes any timm
#: model name besides (checked against timm's registry before a run starts).
TIMM_BACKBONES = ("resnet50", "resnext50_32x4d", "resnext101_32x4d", "vit_small_patch16_224", "vit_base_patch16_224")
#: The backbones of the shipped recipes: the CIFAR ResNet-32 written here, then timm's.
BACKBONES = ("resnet32",) + TIMM_BACKBONES
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
#: What ``model.pretrained`` initialises (fastlt.models.pretrained): the backbone only, or the
#: whole BCL model (backbone, classifier and both heads; a fastlt best.pt / last.pt only).
PRETRAINED_SCOPES = ("backbone", "all")


@dataclass(kw_only=True)
class ModelConfig:
    """The BCL model (docs/design.md §1, "Model (BCL)")."""

    backbone: str = "resnet32"
    """Backbone name: resnet32 (the CIFAR ResNet-32), or any timm model name (resnet50,
    resnext50_32x4d, vit_base_patch16_224, resnet18, convnext_tiny, ...); its feature width is
    read from the built model."""
    feat_dim: int = 128
    """D, the contrastive projection dimension (1024 ImageNet/iNat/Places, 128 CIFAR)."""
    use_norm: bool = False
    """Cosine NormedLinear classifier (scale 30) when true; plain Linear when false (CIFAR)."""
    hidden_dim: int | None = None
    """m, hidden width of the two MLP heads; null = 512 for resnet32, h otherwise."""
    backbone_kwargs: dict = field(default_factory=dict)
    """Extra keyword arguments for the timm backbone (e.g. {img_size: 224} for ViT)."""
    channels_last: bool = False
    """Run convolutions in channels-last memory format (faster on recent GPUs)."""
    sync_bn: bool = False
    """Synchronise BatchNorm statistics over all ranks (torch SyncBatchNorm; CUDA only). Off by
    default: the reference trains with nn.DataParallel, whose BatchNorm sees each GPU's share."""
    freeze_bn: bool = False
    """BatchNorm uses its running statistics and never updates them (affine weights still train):
    for fine-tuning pretrained weights; the model's outputs then do not depend on the batch split."""
    pretrained: str = ""
    """Local weights to start from (nothing is downloaded): a timm / torchvision state dict
    (.pth, .pt, .bin or .safetensors) for the backbone, or a fastlt best.pt / last.pt /
    checkpoint directory. Empty = random initialisation."""
    pretrained_scope: str = "backbone"
    """What model.pretrained initialises: backbone, or all (the whole model; fastlt weights only)."""

    def __post_init__(self):
        check_path("model.pretrained", self.pretrained)
        if not isinstance(self.backbone, str) or not _NAME.match(self.backbone):
            raise ConfigError(f"model.backbone: expected resnet32 or a timm model name such as resnet50; "
                              f"got {self.backbone!r}")
        positive("model.feat_dim", self.feat_dim)
        one_of("model.pretrained_scope", self.pretrained_scope, PRETRAINED_SCOPES)
        if self.hidden_dim is not None:
            positive("model.hidden_dim", self.hidden_dim)
        if self.sync_bn and self.freeze_bn:
            raise ConfigError("model.sync_bn and model.freeze_bn: frozen statistics are never synchronised; "
                              "choose one")
        if self.backbone == "resnet32" and self.backbone_kwargs:
            raise ConfigError(f"model.backbone_kwargs: resnet32 takes no options; got {self.backbone_kwargs!r}. "
                              "Remove model.backbone_kwargs.")


def check_input_size(model: ModelConfig, image_size: int) -> None:
    """ConfigError unless a ViT's patch grid fits ``data.image_size``: timm's ViT takes inputs of
    exactly ``img_size`` (default: the size in its name) cut into whole patches, and would
    otherwise fail at the first forward pass, after DeepSpeed has started."""
    m = re.search(r"_patch(\d+)_(\d+)$", model.backbone)
    if m is None:
        return
    patch, default = int(m.group(1)), int(m.group(2))
    size = model.backbone_kwargs.get("img_size", default)
    if image_size % patch:
        raise ConfigError(f"data.image_size: {model.backbone} cuts images into {patch}×{patch} patches, so the size "
                          f"must be a multiple of {patch}; got {image_size}")
    if size != image_size and not model.backbone_kwargs.get("dynamic_img_size", False):
        raise ConfigError(f"data.image_size: {model.backbone} is built for {size}×{size} inputs (model.backbone_kwargs."
                          f"img_size), but data.image_size is {image_size}; set --set model.backbone_kwargs="
                          f"'{{img_size: {image_size}}}' or data.image_size={size}")
