"""BCL models (docs/design.md §1, "Model (BCL)"): backbone → classifier, contrastive head and
center head.

* :mod:`fastlt.models.config` — the ``model`` config section and the backbone names (no torch);
* :mod:`fastlt.models.cifar_resnet` — the CIFAR ResNet-32 of BCL/LDAM;
* :mod:`fastlt.models.bcl` — :class:`BCLModel`, :class:`NormedLinear`, :func:`build_backbone`
  (timm backbones) and :func:`build_model` (a model from a config);
* :mod:`fastlt.models.replica_bn` — :class:`ReplicaGroupBatchNorm`, BatchNorm over the published
  runs' four DataParallel groups (``method.reference_parallelism: dp4``).

The torch modules are imported on first use, so ``fastlt.config.loader`` can name the backbones
without importing torch.
"""
from fastlt._lazy import lazy_exports

from .config import BACKBONES, TIMM_BACKBONES, ModelConfig

_lazy_all, __getattr__, __dir__ = lazy_exports(__name__, {
    "BCLModel": "bcl", "BCLOutput": "bcl", "NormedLinear": "bcl", "build_backbone": "bcl", "build_model": "bcl",
    "resnet32": "cifar_resnet", "ReplicaGroupBatchNorm": "replica_bn", "convert_replica_batchnorm": "replica_bn",
})
__all__ = sorted(["BACKBONES", "ModelConfig", "TIMM_BACKBONES", *_lazy_all])
