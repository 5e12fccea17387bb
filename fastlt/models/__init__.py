"""BCL models (ARCHITECTURE §1, "Model (BCL)"): backbone → classifier, contrastive head and
center head.

* :mod:`fastlt.models.config` — the ``model`` config section and the backbone names (no torch);
* :mod:`fastlt.models.cifar_resnet` — the CIFAR ResNet-32 of BCL/LDAM;
* :mod:`fastlt.models.bcl` — :class:`BCLModel`, :class:`NormedLinear`, :func:`build_backbone`
  (timm backbones) and :func:`build_model` (a model from a config).

The torch modules are imported on first use, so ``fastlt.config`` can name the backbones
without importing torch.
"""
from __future__ import annotations

import importlib

from .config import BACKBONES, TIMM_BACKBONES, ModelConfig

__all__ = ["BACKBONES", "BCLModel", "BCLOutput", "ModelConfig", "NormedLinear", "TIMM_BACKBONES", "build_backbone",
           "build_model", "resnet32"]

_LAZY = {"BCLModel": "bcl", "BCLOutput": "bcl", "NormedLinear": "bcl", "build_backbone": "bcl", "build_model": "bcl",
         "resnet32": "cifar_resnet"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
