"""The training objective and step of ConCutMix + BCL (ARCHITECTURE §1 "Losses", steps of the
"Semantically consistent label").

One step:

1. one forward pass over cat[view 0 (CutMix applied), view 1, view 2] (3B images);
2. L_BalSCL on the normalised z of views 1 and 2, stacked (B, 2, D), with the background
   labels and the normalised class centers;
3. L_cls = logit-adjusted CE on the logits of the first B images, with the area label
   λ·onehot(a) + (1−λ)·onehot(b) while epoch ≤ l_d_warm (the same as λ·CE(a) + (1−λ)·CE(b)),
   and with the rectified ConCutMix label of the mixed samples after that, computed from the
   detached unnormalised z and centers;
4. L = α·L_cls + β·L_BalSCL, backward and optimizer step through the engine.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import Tensor, nn

from fastlt.label_stats import STAT_COLUMNS, step_stats
from fastlt.labels import area_label, rectify_labels
from fastlt.losses import BalancedSupConLoss, LogitAdjustedCrossEntropy

__all__ = ["STEP_COLUMNS", "ConCutMixObjective", "train_step"]

#: What :func:`train_step` returns, column by column.
STEP_COLUMNS = ("loss", "ce", "scl") + STAT_COLUMNS


def _phase(name: str):
    """A ``torch.profiler`` range ``fastlt::<name>`` while a profiler records (``fastlt profile``);
    a null context otherwise (one flag test)."""
    if torch.autograd.profiler._is_profiler_enabled:
        return torch.profiler.record_function(f"fastlt::{name}")
    return contextlib.nullcontext()


class ConCutMixObjective(nn.Module):
    """L = α·LA-CE(logits of view 0, label) + β·BalSCL(views 1, 2) (ARCHITECTURE §1).

    Args:
        method: the ``method`` config section (:class:`fastlt.method.MethodConfig`).
        class_counts: (C,) training images per class.
    """

    def __init__(self, method, class_counts):
        super().__init__()
        self.method = method
        self.ce = LogitAdjustedCrossEntropy(class_counts, method.tau)
        self.scl = BalancedSupConLoss(class_counts, method.temperature, method.scl_scope)
        self.register_buffer("class_counts", torch.as_tensor(np.asarray(class_counts), dtype=torch.float64),
                             persistent=False)

    @property
    def num_classes(self) -> int:
        return int(self.class_counts.numel())

    def forward(self, out, batch, *, rectify: bool) -> tuple[Tensor, Tensor, Tensor]:
        """(loss, ce, scl) for a model output over cat[image, view1, view2] and its TrainBatch.

        Also leaves the step's label diagnostics (``fastlt.label_stats.step_stats``, on the
        device) in ``self.stats``.
        """
        m = self.method
        b = batch.label_a.shape[0]
        logits = out.logits[:b]
        features = torch.stack([out.z[b:2 * b], out.z[2 * b:]], dim=1).float()
        scl = self.scl(out.centers.float(), features, batch.label_a)
        target = area_label(batch.label_a, batch.label_b, batch.lam, self.num_classes)
        area, rect = target, None
        if rectify:
            rect = rectify_labels(out.z_raw[:b].detach(), out.centers_raw.detach(), batch.label_a, batch.label_b,
                                  batch.lam, self.class_counts, topk=m.topk, omega=m.omega,
                                  normalize=m.label_normalize, temperature=m.label_temperature)
            # Only mixed samples get the ConCutMix label; an unmixed one keeps its one-hot label
            # (torch.where, not boolean indexing: no host sync).
            target = torch.where(batch.mixed[:, None], rect, target)
        self.stats = step_stats(logits, target, area, rect, batch, self.class_counts, m.omega)
        ce = self.ce(logits, target)
        loss = m.alpha * ce + m.beta * scl
        return loss, ce, scl


def train_step(engine, objective: ConCutMixObjective, batch, *, rectify: bool) -> Tensor:
    """One training step (steps 1–4 of the module docstring) on a TrainBatch already on the device.

    ``batch.images`` goes to the model as it is: the pipelines deliver it as one (3B, 3, H, W)
    tensor in the model's memory format and dtype. ``engine`` is the DeepSpeed engine, or
    anything with its three calls (``engine(x)``, ``engine.backward(loss)``, ``engine.step()``:
    bench/bench_train_step.py runs the step on a plain optimizer where DeepSpeed is not
    installed). Returns the detached (loss, ce, scl) followed by the label diagnostics
    (``fastlt.label_stats.STAT_COLUMNS``) as one float32 tensor on the device
    (:data:`STEP_COLUMNS`); nothing here waits for the device. Under ``torch.profiler`` the four
    parts are the ranges ``fastlt::forward``, ``fastlt::objective``, ``fastlt::backward`` and
    ``fastlt::optimizer_step``.
    """
    with _phase("forward"):
        out = engine(batch.images)
    with _phase("objective"):
        loss, ce, scl = objective(out, batch, rectify=rectify)
    with _phase("backward"):
        engine.backward(loss)
    with _phase("optimizer_step"):
        engine.step()
    return torch.cat([torch.stack([loss.detach(), ce.detach(), scl.detach()]).float(), objective.stats])
