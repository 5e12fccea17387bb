"""Evaluation (docs/design.md §1 "Evaluation"): top-1 on the balanced val/test split and
many/medium/few-shot accuracy (``fastlt.reports.metrics.shot_accuracy``, groups from the training
class counts).

* :func:`predict` runs the model over one rank's share of a validation pipeline, in the
  run's precision (``fastlt.training.engine.precision_of``: the same dtypes as the training step);
* :func:`evaluate_model` gathers every rank's predictions and returns the metrics (identical
  on every rank; the val pipelines shard without padding, so every image counts once);
* :func:`run_eval` is ``fastlt eval``: a config plus a checkpoint (best.pt / last.pt, a
  checkpoint directory or a run directory) on the val or test list, in one process.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from fastlt.training.distributed import gather_variable
from fastlt.training.engine import Precision

__all__ = ["checkpoint_run_dir", "evaluate_model", "load_checkpoint_model", "predict", "run_eval", "write_metrics"]


@torch.no_grad()
def predict(model: nn.Module, batches, *, device, precision: Precision | None = None,
            channels_last: bool = False) -> tuple[Tensor, Tensor]:
    """(predicted classes, labels) as int64 tensors on ``device`` for every batch of ``batches``."""
    was_training = model.training
    model.eval()
    preds, labels = [], []
    device = torch.device(device)
    input_dtype = precision.input_dtype if precision is not None else None
    amp = precision.autocast(device.type) if precision is not None else contextlib.nullcontext()
    try:
        for images, y in batches:
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if input_dtype is not None:
                images = images.to(input_dtype)
            with amp:
                logits = model(images).logits
            preds.append(logits.argmax(dim=1))
            labels.append(y.to(device, non_blocking=True))
    finally:
        model.train(was_training)
    if not preds:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return empty, empty.clone()
    return torch.cat(preds).long(), torch.cat(labels).long()


def evaluate_model(model: nn.Module, batches, train_class_counts, *, device, precision: Precision | None = None,
                   channels_last: bool = False, shots=None) -> dict:
    """shot_accuracy over the whole split (all ranks' shares): overall, many, medium, few, per_class, n
    and per_class_n (evaluated images per class)."""
    from fastlt.reports.metrics import FEW_SHOT, MANY_SHOT, shot_accuracy

    preds, labels = predict(model, batches, device=device, precision=precision, channels_last=channels_last)
    preds, labels = gather_variable(preds), gather_variable(labels)
    counts = np.asarray(train_class_counts)
    many, few = shots if shots is not None else (MANY_SHOT, FEW_SHOT)
    out = shot_accuracy(preds.cpu(), labels.cpu(), counts, many=many, few=few)
    out["n"] = int(labels.numel())
    out["per_class_n"] = np.bincount(labels.cpu().numpy(), minlength=counts.size).tolist()
    return out


def load_checkpoint_model(cfg, checkpoint: str | Path, num_classes: int) -> tuple[nn.Module, dict]:
    """(the config's model with the checkpoint's weights, on the CPU; the checkpoint's meta).
    Raises CheckpointError when the checkpoint belongs to another model."""
    from fastlt.training.checkpoint import load_weights, model_signature
    from fastlt.errors import CheckpointError
    from fastlt.models import build_model

    model = build_model(cfg, num_classes)
    state, meta = load_weights(checkpoint)
    expected = model_signature(model, cfg)
    saved = meta.get("signature")
    if saved is not None and saved != expected:
        diff = [f"{k}: checkpoint {saved.get(k)!r}, config {v!r}" for k, v in expected.items() if saved.get(k) != v]
        raise CheckpointError(f"{checkpoint} was trained with a different model ({'; '.join(diff)}); "
                              "evaluate it with the config of its run (config.yaml in the run directory)")
    from fastlt.models.pretrained import check_tensor_kinds

    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def names(xs):
            return "none" if not xs else f"{len(xs)}: " + ", ".join(xs[:4]) + (f" (+{len(xs) - 4} more)"
                                                                                 if len(xs) > 4 else "")
        raise CheckpointError(f"{checkpoint} does not fit the model of this config: missing {names(missing)}; "
                              f"unexpected {names(unexpected)}; shape differs (checkpoint vs model) {names(shapes)}. "
                              "Evaluate it with the config of its run (config.yaml in the run directory)")
    check_tensor_kinds(state, own, checkpoint, "model")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{checkpoint} does not fit the model of this config: "
                              + "; ".join(ln.strip() for ln in str(e).splitlines() if ln.strip())) from None
    return model, meta


def run_eval(cfg, checkpoint: str | Path, split: str = "val") -> dict:
    """``fastlt eval``: evaluate a checkpoint of ``cfg``'s model on its val or test list, one process.

    The many/medium/few groups come from the training class counts, so the training list
    (or CIFAR/synthetic data) of the config must be readable too.
    """
    from fastlt.data.build import build_datasets
    from fastlt.training.distributed import resolve_device
    from fastlt.training.engine import precision_of
    from fastlt.errors import ConfigError, DataError
    from fastlt.pipelines import build_val_pipeline, select_backend, val_spec

    if split not in ("val", "test"):
        raise ConfigError(f"--split must be val or test; got {split!r}")
    device = resolve_device(cfg.run.device)
    if device == "cpu":  # the safe loader imports DeepSpeed's checkpoint classes; no accelerator probing
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    data = build_datasets(cfg)
    dataset = data.val if split == "val" else data.test
    if dataset is None:
        raise DataError("--split test: the config has no test split; set data.test_list (list datasets) or "
                        "data.test_dir (folder datasets)")
    model, _ = load_checkpoint_model(cfg, checkpoint, data.num_classes)
    precision = precision_of(cfg.deepspeed)
    model.to(torch.device(device), dtype=precision.weight_dtype)
    if cfg.model.channels_last:
        model.to(memory_format=torch.channels_last)
    backend = select_backend(cfg.pipeline.backend)
    batches = build_val_pipeline(val_spec(cfg, dataset, device=device), backend)
    metrics = evaluate_model(model, batches, data.class_counts, device=device, precision=precision,
                             channels_last=cfg.model.channels_last, shots=(cfg.run.many_shot, cfg.run.few_shot))
    metrics.update(split=split, checkpoint=str(checkpoint), train_class_counts=[int(c) for c in data.class_counts],
                   class_names=data.class_names)
    return metrics


def checkpoint_run_dir(checkpoint: str | Path) -> Path:
    """The run directory a checkpoint argument belongs to: best.pt / last.pt -> its folder; a
    checkpoint directory (run_dir/checkpoints/<tag>) -> run_dir; a run directory -> itself."""
    path = Path(checkpoint)
    if path.is_file() and path.name == "latest" and path.parent.name == "checkpoints":  # the pointer file
        return path.parent.parent
    if path.is_file():
        return path.parent
    if (path / "meta.json").is_file() and path.parent.name == "checkpoints":
        return path.parent.parent
    return path


def write_metrics(metrics: dict, path: str | Path) -> None:
    """Write an evaluation result as JSON (atomically; an empty shot group's nan becomes null)."""
    from fastlt.files import json_text, write_text_atomic

    write_text_atomic(path, json_text(metrics))
