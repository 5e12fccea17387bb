"""What the ConCutMix label step does to the labels, measured on the device (docs/design.md §1,
"Semantically consistent label", steps 4–5).

With the published ω the confidence γ = ω·log(Σ_j N_j y_j)/Σ_i log N_i is of the order of
10⁻³, so the rectified label ŷ = γ·ŝ + (1−γ)·y differs from the area label y by a fraction of
a percent. These statistics make that visible at every log interval, over the mixed samples of
the interval's last step (the one step of the interval they are computed on: on the others the
trainer skips them, ``train_step(stats=False)``, which saves about a quarter of the
objective's operator calls per step):

* ``gamma``          — mean γ;
* ``label_l1``       — mean ‖ŷ − y‖₁ (= γ·‖ŝ − y‖₁, at most 2γ);
* ``argmax_changed`` — share of mixed samples whose arg-max class differs between ŷ and y;
* ``topk_outside``   — mean share of the normalised top-K similarity ŝ on classes other than
  a and b (the background and foreground classes): how much the embedding disagrees with the
  area label, whatever the size of γ;

and, for every sample of that step's classification view, ``train_acc``: top-1 of the logits
against the arg-max of the label the sample trains on.

:func:`step_stats` returns per-step *sums* as one small device tensor, so the trainer stacks
them into its per-interval buffer next to the losses and reads everything back in the one
host copy of the interval (:func:`interval_fields`); nothing here synchronises.
:func:`per_sample_stats` gives the same quantities per sample (``fastlt inspect``). Both read
the label in its compact form (``fastlt.kernels.CompactLabel``: K kept classes and their
weights, γ, a, b, λ), the form the training step keeps it in.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["STAT_COLUMNS", "interval_fields", "per_sample_stats", "step_stats"]

#: Columns of :func:`step_stats` (sums over the step's samples).
STAT_COLUMNS = ("correct", "samples", "mixed", "gamma", "label_l1", "argmax_changed", "topk_outside")


def _argmax(cls_: Tensor, value: Tensor, num_classes: int) -> Tensor:
    """Per row, the candidate class of largest value, the lower class index on ties (as a dense
    label's ``argmax(1)``)."""
    best = value == value.max(1, keepdim=True).values
    return torch.where(best, cls_, torch.full_like(cls_, num_classes)).min(1).values


def area_argmax(label) -> Tensor:
    """(B,) arg-max class of the area label λ·onehot(a) + (1−λ)·onehot(b) (ties to the lower index)."""
    a, b, lam = label.label_a, label.label_b, label.lam
    return torch.where(lam > 0.5, a, torch.where(lam < 0.5, b, torch.minimum(a, b)))


def per_sample_stats(label) -> dict[str, Tensor]:
    """γ, ‖ŷ − y‖₁, arg-max changed (bool), top-K share outside {a, b} and the arg-max class of ŷ,
    each (B,), of a ``fastlt.kernels.CompactLabel`` — from its K + 2 candidate classes (the only
    ones where ŷ can be non-zero), computed once; no (B, C) tensor."""
    gamma = label.gamma.float()
    cls_, s_hat, y = label.candidates()
    k = label.index.shape[1]
    # ‖ŷ − y‖₁ = γ·‖ŝ − y‖₁: over the kept classes, plus y's mass on a / b where they were not
    # kept (a class listed twice among the candidates is counted once).
    kept_ab = (cls_[:, k:].unsqueeze(2) == label.index.long().unsqueeze(1)).any(2)  # (B, 2)
    same = label.label_a == label.label_b
    y_ab = y[:, k:] * torch.stack([torch.ones_like(same), ~same], dim=1)
    l1 = (s_hat[:, :k] - y[:, :k]).abs().sum(1) + (y_ab * ~kept_ab).sum(1)
    outside = (cls_[:, :k] != cls_[:, k:k + 1]) & (cls_[:, :k] != cls_[:, k + 1:])
    g = gamma.view(-1, 1)
    argmax = _argmax(cls_, g * s_hat + (1.0 - g) * y, label.num_classes)
    return {"gamma": gamma, "label_l1": gamma * l1, "argmax_changed": argmax != area_argmax(label),
            "topk_outside": (label.weight.float() * outside).sum(1), "argmax": argmax}


def step_stats(logits: Tensor, label, batch, *, rectified: bool) -> Tensor:
    """The (len(STAT_COLUMNS),) float32 sums of one step, on the device (no host sync).

    ``label`` is the ``CompactLabel`` the step trains on (γ = 0 on the rows that keep their
    area label); while area labels are used (``rectified`` false) the label columns are zero.
    """
    pred = logits.detach().argmax(1)
    samples = torch.full((), float(logits.shape[0]), device=logits.device)
    if not rectified:
        correct = (pred == area_argmax(label)).sum().float()
        return torch.cat([torch.stack([correct, samples]), torch.zeros(5, device=logits.device)])
    s = per_sample_stats(label)
    m = batch.mixed.float()
    sums = [(pred == s["argmax"]).sum().float(), samples, m.sum()] + [
        (s[k].float() * m).sum() for k in ("gamma", "label_l1", "argmax_changed", "topk_outside")]
    return torch.stack(sums)


def interval_fields(stats) -> dict:
    """Log-record fields from the (n, len(STAT_COLUMNS)) per-step sums of an interval (on the host;
    rows of steps whose diagnostics were skipped are zero and add nothing).

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
