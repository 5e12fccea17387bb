"""The training objective and step of ConCutMix + BCL (docs/design.md §1 "Losses", steps of the
"Semantically consistent label").

One step:

1. one forward pass over the step's images — view 0 (CutMix applied), view 1, view 2 — as the
   pipeline delivered them (``TrainBatch.images``, 3B images);
2. L_BalSCL on the normalised z of views 1 and 2, stacked (B, 2, D), with the background
   labels and the normalised class centers (the whole global batch with ``scl_scope: global``);
3. L_cls = logit-adjusted CE on the logits of the first B images, with the area label
   λ·onehot(a) + (1−λ)·onehot(b) while epoch ≤ l_d_warm (the same as λ·CE(a) + (1−λ)·CE(b)),
   and with the rectified ConCutMix label of the mixed samples after that, computed from the
   detached unnormalised z and centers;
4. L = α·L_cls + β·L_BalSCL, backward and optimizer step through the engine.

The label is kept in compact form throughout (``fastlt.kernels.CompactLabel``: the K kept
classes and weights, γ, a, b, λ; γ = 0 on the rows that keep their area label): with the Triton
kernels the (B, C) label never exists, and the PyTorch path builds it once, inside the loss.
"""
from __future__ import annotations

import contextlib
import inspect

import numpy as np
import torch
from torch import Tensor, nn

from fastlt.config.loader import COMPILE_MODES
from fastlt.kernels import CompactLabel, rectify_labels_compact
from fastlt.method.label_stats import STAT_COLUMNS, step_stats
from fastlt.method.labels import sum_log_counts
from fastlt.method.losses import BalancedSupConLoss, LogitAdjustedCrossEntropy

__all__ = ["STEP_COLUMNS", "ConCutMixObjective", "compile_step", "train_step"]

#: What :func:`train_step` returns, column by column.
STEP_COLUMNS = ("loss", "ce", "scl") + STAT_COLUMNS


def _phase(name: str):
    """A ``torch.profiler`` range ``fastlt::<name>`` while a profiler records (``fastlt profile``);
    a null context otherwise (one flag test)."""
    if torch.autograd.profiler._is_profiler_enabled:
        return torch.profiler.record_function(f"fastlt::{name}")
    return contextlib.nullcontext()


class ConCutMixObjective(nn.Module):
    """L = α·LA-CE(logits of view 0, label) + β·BalSCL(views 1, 2) (docs/design.md §1).

    Args:
        method: the ``method`` config section (:class:`fastlt.method.config.MethodConfig`).
        class_counts: (C,) training images per class.
    """

    def __init__(self, method, class_counts):
        super().__init__()
        self.method = method
        self.ce = LogitAdjustedCrossEntropy(class_counts, method.tau)
        self.scl = BalancedSupConLoss(class_counts, method.temperature, method.scl_scope)
        counts = torch.as_tensor(np.asarray(class_counts), dtype=torch.float64)
        self.register_buffer("class_counts", counts, persistent=False)
        # γ's denominator Σ_i log N_i, a constant of the run: computed once, not in every step.
        self.register_buffer("log_count_sum", sum_log_counts(counts), persistent=False)
        # The diagnostics of a step that is not logged: zeros, allocated once.
        self.register_buffer("no_stats", torch.zeros(len(STAT_COLUMNS)), persistent=False)

    @property
    def num_classes(self) -> int:
        return int(self.class_counts.numel())

    def label(self, out, batch, *, rectify: bool) -> CompactLabel:
        """The label the step trains on: the area label, or after the warm-up the ConCutMix label
        of the mixed samples (an unmixed sample keeps its one-hot label: γ = 0 on its row)."""
        b = batch.label_a.shape[0]
        if not rectify:
            return CompactLabel.area(batch.label_a, batch.label_b, batch.lam, self.num_classes)
        m = self.method
        label = rectify_labels_compact(out.z_raw[:b].detach(), out.centers_raw.detach(), batch.label_a,
                                       batch.label_b, batch.lam, self.class_counts, topk=m.topk, omega=m.omega,
                                       normalize=m.label_normalize, temperature=m.label_temperature,
                                       log_count_sum=self.log_count_sum)
        # torch.where inside, not boolean indexing: no host sync.
        return label.keep_area_where(~batch.mixed)

    def forward(self, out, batch, *, rectify: bool, stats: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(loss, ce, scl, label diagnostics) for a model output over the step's images and its
        TrainBatch; the diagnostics are ``fastlt.method.label_stats.step_stats`` sums, on the device,
        or zeros (nothing computed) with ``stats`` false — the steps the trainer does not log."""
        m = self.method
        b = batch.label_a.shape[0]
        logits = out.logits[:b]
        features = torch.stack([out.z[b:2 * b], out.z[2 * b:]], dim=1).float()
        scl = self.scl(out.centers.float(), features, batch.label_a)
        label = self.label(out, batch, rectify=rectify)
        ce = self.ce(logits, label)
        loss = m.alpha * ce + m.beta * scl
        if not stats:
            return loss, ce, scl, self.no_stats.to(loss.device)
        return loss, ce, scl, step_stats(logits, label, batch, rectified=rectify)


def compile_step(engine, objective: ConCutMixObjective, mode: str, backend: str = "inductor") -> None:
    """Compile the model (through the engine: DeepSpeed's ``engine.compile``, else the module's
    own ``compile``) and the objective with ``torch.compile`` (``run.compile`` /
    ``run.compile_backend``). The custom ops of ``fastlt.kernels`` have fake implementations,
    so the label and loss kernels stay inside the graphs. ``mode="off"`` does nothing."""
    if mode == "off":
        return
    if mode not in COMPILE_MODES:
        raise ValueError(f"run.compile must be one of {COMPILE_MODES}; got {mode!r}")
    kwargs = {} if mode == "default" else {"mode": mode}
    if "compile_kwargs" in inspect.signature(getattr(engine, "compile", lambda: None)).parameters:
        engine.compile(backend=backend, compile_kwargs=kwargs)  # DeepSpeed's: its hooks stay outside the graph
    else:
        getattr(engine, "module", engine).compile(backend=backend, **kwargs)
    objective.compile(backend=backend, **kwargs)


def train_step(engine, objective: ConCutMixObjective, batch, *, rectify: bool, stats: bool = True) -> Tensor:
    """One training step (steps 1–4 of the module docstring) on a TrainBatch already on the device.

    ``batch.images`` goes to the model as it is: the pipelines deliver it as one (3B, 3, H, W)
    tensor in the model's memory format and dtype. ``engine`` is the DeepSpeed engine, or
    anything with its three calls (``engine(x)``, ``engine.backward(loss)``, ``engine.step()``;
    ``fastlt.training.engine.PlainEngine`` gives them on a plain ``torch.optim`` optimizer). Returns the
    detached (loss, ce, scl) followed by the label diagnostics (``fastlt.method.label_stats.STAT_COLUMNS``)
    as one float32 tensor on the device (:data:`STEP_COLUMNS`); nothing here waits for the device.
    ``stats=False`` skips the diagnostics (their columns are zero): the trainer computes them on
    the step that ends each log interval only, where they are read.
    Under ``torch.profiler`` the four parts are the ranges ``fastlt::forward``,
    ``fastlt::objective``, ``fastlt::backward`` and ``fastlt::optimizer_step``.
    """
    with _phase("forward"):
        out = engine(batch.images)
    with _phase("objective"):
        loss, ce, scl, diagnostics = objective(out, batch, rectify=rectify, stats=stats)
    with _phase("backward"):
        engine.backward(loss)
    with _phase("optimizer_step"):
        engine.step()
    return torch.cat([torch.stack([loss.detach(), ce.detach(), scl.detach()]).float(), diagnostics])
