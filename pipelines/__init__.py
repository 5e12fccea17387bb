"""Data pipelines for fastlt, installed as `fastlt.pipelines` (see setup.py's package_dir):
the DALI training/validation graphs and the torch DataLoader backend, both producing the
typed training batch of docs/design.md §3.

The trainer uses four entry points::

    backend = select_backend(cfg.pipeline.backend)          # "auto" | "dali" | "torch"
    train = build_train_pipeline(train_spec(cfg, dataset, batch_size=b, ...), backend)
    for batch in train.epoch(epoch, start_step):            # TrainBatch, on spec.device
        ...
    for images, labels in build_val_pipeline(val_spec(cfg, dataset, ...), backend):
        ...

The backend is decided in one place, :func:`select_backend`: ``auto`` takes DALI when
``nvidia.dali`` imports and the torch loader otherwise (the environment variable
``FASTLT_PIPELINE=dali|torch`` overrides ``auto``); an explicit ``dali`` that cannot be met
raises instead of falling back. The choice is logged once, with its reason
(:func:`choose_backend`); the trainer prints both in its opening lines.

Layout: ``spec`` (what is asked for; no torch), ``batch`` (what comes out), ``common``
(keyed randomness, sample streams, bad-input policy), ``transforms`` + ``torch_loader`` (the
torch backend), ``dali_ops`` + ``dali_sources`` + ``dali_base`` + ``dali_train`` + ``dali_val``
(the DALI backend). Importing this package imports neither torch nor DALI; the backends are
imported when a pipeline is built.
"""
from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Iterable, Iterator, Protocol

from .spec import (CIFAR_MEAN, CIFAR_STD, EXTRA_KEYS, IMAGENET_MEAN, IMAGENET_STD, INAT_MEAN, INAT_STD, NORMALIZATIONS,
                   ON_ERROR, PIPELINE_BACKENDS, RECIPES, PipelineConfig, TrainPipelineSpec, ValPipelineSpec,
                   normalization, train_spec, val_spec)
from .common import LOG

if TYPE_CHECKING:
    from torch import Tensor

    from .batch import TrainBatch

__all__ = ["CIFAR_MEAN", "CIFAR_STD", "EXTRA_KEYS", "IMAGENET_MEAN", "IMAGENET_STD", "INAT_MEAN", "INAT_STD",
           "NORMALIZATIONS", "ON_ERROR", "PIPELINE_BACKENDS", "PipelineConfig", "RECIPES", "TrainBatch",
           "TrainPipeline", "TrainPipelineSpec", "ValPipelineSpec", "build_train_pipeline", "build_val_pipeline",
           "choose_backend", "dali_available", "normalization", "select_backend", "train_spec", "val_spec"]

_ENV = "FASTLT_PIPELINE"
_logged: set[tuple[str, str]] = set()

#: How to get DALI: fastlt's extras follow DALI's own wheels, one per CUDA major version (the
#: wheels include the CPU operators used without a GPU). Match the CUDA of your torch build.
DALI_INSTALL_HINT = ("install the DALI extra of your CUDA major version, `pip install fastlt[dali-cuda12]` or "
                     "`pip install fastlt[dali-cuda13]` (DALI's nvidia-dali-cuda120 / nvidia-dali-cuda130 wheels), "
                     "or set pipeline.backend: torch")


def __getattr__(name: str):
    if name == "TrainBatch":  # imports torch: only on first use
        return importlib.import_module(".batch", __name__).TrainBatch
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class TrainPipeline(Protocol):
    """What both backends provide (``TorchTrainPipeline``, ``DaliTrainPipeline``)."""

    backend: str
    steps_per_epoch: int

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[TrainBatch]: ...

    def stats(self) -> dict: ...

    def close(self) -> None: ...


def dali_available() -> tuple[bool, str]:
    """(True, version) when ``nvidia.dali`` imports, else (False, the import error)."""
    try:
        import nvidia.dali as dali
    except Exception as e:  # ImportError, or a broken install failing on its shared libraries
        return False, f"{type(e).__name__}: {e}"
    return True, getattr(dali, "__version__", "unknown")


def choose_backend(requested: str = "auto") -> tuple[str, str]:
    """(backend, why) for ``pipeline.backend``: "dali" or "torch" and the reason, in words
    (requested by the config or the environment, or what ``auto`` found). Logs nothing."""
    if requested not in PIPELINE_BACKENDS:
        raise ValueError(f"pipeline.backend must be one of {PIPELINE_BACKENDS}; got {requested!r}")
    source = "config"
    if requested == "auto" and os.environ.get(_ENV):
        requested, source = os.environ[_ENV], f"environment {_ENV}"
        if requested not in PIPELINE_BACKENDS:
            raise ValueError(f"{_ENV} must be one of {PIPELINE_BACKENDS}; got {requested!r}")
    if requested == "torch":  # importing DALI (0.7 s) only to be told it is not wanted
        return requested, f"requested by {source}"
    ok, info = dali_available()
    if requested == "dali" and not ok:
        raise RuntimeError(f"pipeline.backend 'dali' was requested ({source}) but nvidia.dali does not import "
                           f"({info}); {DALI_INSTALL_HINT}")
    if requested != "auto":
        return requested, f"requested by {source}"
    if ok:
        return "dali", f"auto: DALI {info} imports"
    return "torch", (f"auto: nvidia.dali does not import ({info}); for the DALI pipelines "
                     + DALI_INSTALL_HINT.removesuffix(", or set pipeline.backend: torch"))


def select_backend(requested: str = "auto") -> str:
    """Resolve ``pipeline.backend`` to "dali" or "torch" (see the module docstring and
    :func:`choose_backend`); the choice and its reason are logged once."""
    chosen, why = choose_backend(requested)
    if (chosen, why) not in _logged:
        _logged.add((chosen, why))
        LOG.info("data pipeline backend: %s (%s)", chosen, why)
    return chosen


def build_train_pipeline(spec: TrainPipelineSpec, backend: str = "auto") -> TrainPipeline:
    """The training pipeline of ``spec`` on the selected backend."""
    if select_backend(backend) == "dali":
        from .dali_train import DaliTrainPipeline

        return DaliTrainPipeline(spec)
    from .torch_loader import TorchTrainPipeline

    return TorchTrainPipeline(spec)


def build_val_pipeline(spec: ValPipelineSpec, backend: str = "auto") -> Iterable[tuple[Tensor, Tensor]]:
    """The validation pipeline of ``spec``: iterable of (images float NCHW normalised, labels int64),
    this rank's share without padding; iterating again is another pass."""
    if select_backend(backend) == "dali":
        from .dali_val import DaliValPipeline

        return DaliValPipeline(spec)
    from .torch_loader import TorchValPipeline

    return TorchValPipeline(spec)
