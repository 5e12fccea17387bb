"""What the ConCutMix label step does to the labels, measured on the device (ARCHITECTURE §1,
"Semantically consistent label", steps 4–5).

With the published ω the confidence γ = ω·log(Σ_j N_j y_j)/Σ_i log N_i is of the order of
10⁻³, so the rectified label ŷ = γ·ŝ + (1−γ)·y differs from the area label y by a fraction of
a percent. These statistics make that visible per log interval, over the mixed samples:

* ``gamma``          — mean γ;
* ``label_l1``       — mean ‖ŷ − y‖₁ (= γ·‖ŝ − y‖₁, at most 2γ);
* ``argmax_changed`` — share of mixed samples whose arg-max class differs between ŷ and y;
* ``topk_outside``   — mean share of the normalised top-K similarity ŝ on classes other than
  a and b (the background and foreground classes), recovered as Σ_{j∉{a,b}} ŷ_j / γ: how much
  the embedding disagrees with the area label, whatever the size of γ;

and, for every sample of the classification view, ``train_acc``: top-1 of the logits against
the arg-max of the label the sample trains on.

:func:`step_stats` returns per-step *sums* as one small device tensor, so the trainer stacks
them into its per-interval buffer next to the losses and reads everything back in the one
host copy of the interval (:func:`interval_fields`); nothing here synchronises.
:func:`per_sample_stats` gives the same quantities per sample (``fastlt inspect``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastlt.labels import confidence

__all__ = ["STAT_COLUMNS", "interval_fields", "per_sample_stats", "step_stats"]

#: Columns of :func:`step_stats` (sums over the step's samples).
STAT_COLUMNS = ("correct", "samples", "mixed", "gamma", "label_l1", "argmax_changed", "topk_outside")


def per_sample_stats(y: Tensor, y_hat: Tensor, label_a: Tensor, label_b: Tensor, class_counts: Tensor,
                     omega: float) -> dict[str, Tensor]:
    """γ, ‖ŷ − y‖₁, arg-max changed (bool) and top-K share outside {a, b}, each (B,), for area
    labels ``y`` and rectified labels ``y_hat`` (B, C) of the same samples."""
    gamma = confidence(y, class_counts, omega)
    diff = (y_hat - y).abs().sum(1)
    changed = y_hat.argmax(1) != y.argmax(1)
    ab = torch.zeros_like(y_hat, dtype=torch.bool)
    ab.scatter_(1, label_a.view(-1, 1).long(), True)
    ab.scatter_(1, label_b.view(-1, 1).long(), True)
    outside = torch.where(ab, torch.zeros_like(y_hat), y_hat).sum(1)
    # ŷ_j = γ·ŝ_j wherever y_j = 0, so ŝ's mass outside {a, b} is that of ŷ divided by γ.
    share = torch.where(gamma > 0, outside / gamma.clamp_min(torch.finfo(gamma.dtype).tiny), torch.zeros_like(gamma))
    return {"gamma": gamma, "label_l1": diff, "argmax_changed": changed, "topk_outside": share}


def step_stats(logits: Tensor, target: Tensor, y: Tensor, y_hat: Tensor | None, batch, class_counts: Tensor,
               omega: float) -> Tensor:
    """The (len(STAT_COLUMNS),) float32 sums of one step, on the device (no host sync).

    ``target`` is the label the step trains on, ``y`` the area label and ``y_hat`` the rectified
    label (None while area labels are used: the label columns are then zero).
    """
    correct = (logits.detach().argmax(1) == target.argmax(1)).sum().float()
    samples = torch.full((), float(target.shape[0]), device=target.device)
    if y_hat is None:
        zero = torch.zeros(5, device=target.device)
        return torch.cat([torch.stack([correct, samples]), zero])
    s = per_sample_stats(y, y_hat, batch.label_a, batch.label_b, class_counts, omega)
    m = batch.mixed.float()
    sums = [m.sum()] + [(s[k].float() * m).sum() for k in ("gamma", "label_l1", "argmax_changed", "topk_outside")]
    return torch.cat([torch.stack([correct, samples]), torch.stack(sums)])


def interval_fields(stats) -> dict:
    """Log-record fields from the (n, len(STAT_COLUMNS)) per-step sums of an interval (on the host).

    ``train_acc`` is in percent; ``rectified_share`` is the share of samples that trained on a
    rectified label; the label fields are None when none did (area labels, or no CutMix drawn).
    """
    total = stats.sum(0) if hasattr(stats, "sum") else stats
    col = {name: float(total[i]) for i, name in enumerate(STAT_COLUMNS)}
    out = {"train_acc": 100.0 * col["correct"] / col["samples"] if col["samples"] else None}
    mixed = col["mixed"]
    for name in ("gamma", "label_l1", "argmax_changed", "topk_outside"):
        out[name] = col[name] / mixed if mixed > 0 else None
    out["rectified_share"] = mixed / col["samples"] if col["samples"] else None
    return out
