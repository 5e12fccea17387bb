"""fastlt: Contrastive CutMix (ConCutMix, Pan et al., TIP 2024) on Balanced Contrastive
Learning (BCL, Zhu et al., CVPR 2022) for long-tailed image recognition.

The package, by concept:

* ``fastlt.config`` — the typed configuration and the shipped recipes;
* ``fastlt.data`` — long-tailed datasets (list files, image folders, CIFAR-LT, synthetic);
* ``fastlt.method`` — what the paper defines: samplers, CutMix, the semantically consistent
  label, the losses and the objective;
* ``fastlt.models`` — the BCL model (backbone, classifier, contrastive and centre heads);
* ``fastlt.pipelines`` — DALI and torch data pipelines, both yielding ``TrainBatch``;
* ``fastlt.kernels`` — Triton kernels for the label step and its loss;
* ``fastlt.training`` — the DeepSpeed trainer, checkpoints, distributed helpers;
* ``fastlt.reports`` — logs, metrics, plots, ``fastlt data`` / ``inspect`` / ``profile``;
* ``fastlt.cli`` — the ``fastlt`` command; ``fastlt.errors`` and ``fastlt.files`` — the
  expected failures and the file helpers everything uses.

docs/design.md gives the equations each module implements. The most used names are
re-exported here and imported on first use (``import fastlt`` does not import torch).
"""
from fastlt._lazy import lazy_exports

__version__ = "0.1.0"

_all, __getattr__, __dir__ = lazy_exports(__name__, {
    "Config": "config", "load_config": "config",
    "BCLModel": "models", "build_model": "models",
    "LongTailedList": "data", "ImageFolderLT": "data",
    "make_sampler": "method", "area_label": "method", "rectify_labels": "method",
    "LogitAdjustedCrossEntropy": "method", "BalancedSupConLoss": "method",
    "ConCutMixObjective": "method", "train_step": "method",
    "Trainer": "training", "train": "training",
})
__all__ = ["__version__", *_all]
