"""Evaluation (ARCHITECTURE §1 "Evaluation"): top-1 on the balanced val/test split and
many/medium/few-shot accuracy (``fastlt.metrics.shot_accuracy``, groups from the training
class counts).

* :func:`predict` runs the model over one rank's share of a validation pipeline;
* :func:`gather_variable` concatenates per-rank results of different lengths (the val
  pipelines shard without padding, so every image counts exactly once);
* :func:`evaluate_model` does both and returns the metrics (identical on every rank);
* :func:`run_eval` is ``fastlt eval``: a config plus a checkpoint (best.pt / last.pt, a
  checkpoint directory or a run directory) on the val or test list, in one process.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["evaluate_model", "gather_variable", "predict", "run_eval"]


@torch.no_grad()
def predict(model: nn.Module, batches, *, device, autocast_dtype: torch.dtype | None = None,
            input_dtype: torch.dtype | None = None, channels_last: bool = False) -> tuple[Tensor, Tensor]:
    """(predicted classes, labels) as int64 tensors on ``device`` for every batch of ``batches``."""
    was_training = model.training
    model.eval()
    preds, labels = [], []
    device = torch.device(device)
    amp = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
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


def gather_variable(t: Tensor) -> Tensor:
    """Concatenate a 1-D tensor of per-rank length over all ranks (every rank gets the result)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return t
    world = torch.distributed.get_world_size()
    n = torch.tensor([t.numel()], device=t.device, dtype=torch.int64)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    torch.distributed.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    padded = torch.zeros(max(sizes), dtype=t.dtype, device=t.device)
    padded[: t.numel()] = t
    parts = [torch.zeros_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def evaluate_model(model: nn.Module, batches, train_class_counts, *, device, autocast_dtype=None, input_dtype=None,
                   channels_last: bool = False) -> dict:
    """shot_accuracy over the whole split (all ranks' shares): overall, many, medium, few, per_class, n."""
    from fastlt.metrics import shot_accuracy

    preds, labels = predict(model, batches, device=device, autocast_dtype=autocast_dtype, input_dtype=input_dtype,
                            channels_last=channels_last)
    preds, labels = gather_variable(preds), gather_variable(labels)
    out = shot_accuracy(preds.cpu(), labels.cpu(), np.asarray(train_class_counts))
    out["n"] = int(labels.numel())
    return out


def run_eval(cfg, checkpoint: str | Path, split: str = "val") -> dict:
    """``fastlt eval``: evaluate a checkpoint of ``cfg``'s model on its val or test list, one process.

    The many/medium/few groups come from the training class counts, so the training list
    (or CIFAR/synthetic data) of the config must be readable too.
    """
    from fastlt.checkpoint import CheckpointError, load_weights, model_signature
    from fastlt.config import ConfigError
    from fastlt.pipelines import build_val_pipeline, select_backend
    from fastlt.train import DataError, build_datasets, build_model, resolve_device, val_spec

    if split not in ("val", "test"):
        raise ConfigError(f"--split must be val or test; got {split!r}")
    device = resolve_device(cfg.run.device)
    if device == "cpu":  # the safe loader imports DeepSpeed's checkpoint classes; no accelerator probing
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    data = build_datasets(cfg)
    dataset = data.val if split == "val" else data.test
    if dataset is None:
        raise DataError("--split test: the config has no test list; set data.test_list (list datasets only)")
    model = build_model(cfg, data.num_classes)
    state, meta = load_weights(checkpoint)
    expected = model_signature(model, cfg)
    saved = meta.get("signature")
    if saved is not None and saved != expected:
        diff = [f"{k}: checkpoint {saved.get(k)!r}, config {v!r}" for k, v in expected.items() if saved.get(k) != v]
        raise CheckpointError(f"{checkpoint} was trained with a different model ({'; '.join(diff)}); "
                              "evaluate it with the config of its run (config.yaml in the run directory)")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{checkpoint} does not fit the model of this config: {str(e).splitlines()[0]}") from None
    dev = torch.device(device)
    model.to(dev)
    backend = select_backend(cfg.pipeline.backend)
    batches = build_val_pipeline(val_spec(cfg, dataset, rank=0, world_size=1, device=device), backend)
    ds = cfg.deepspeed
    autocast = None
    if ds.precision != "fp32" and device == "cuda":
        autocast = torch.bfloat16 if ds.precision == "bf16" else torch.float16
    metrics = evaluate_model(model, batches, data.class_counts, device=dev, autocast_dtype=autocast,
                             channels_last=cfg.model.channels_last)
    metrics.update(split=split, checkpoint=str(checkpoint))
    return metrics


def write_metrics(metrics: dict, path: str | Path) -> None:
    """Write an evaluation result as JSON (atomically)."""
    from fastlt.checkpoint import write_text_atomic

    write_text_atomic(path, json.dumps(metrics, indent=1))
