"""The pieces of the ConCutMix label and of the losses that both the PyTorch references
(:mod:`fastlt.method.labels`, :mod:`fastlt.method.losses`) and the Triton kernels of
``fastlt.kernels`` use: the area label y (step 5), the top-K selection with its tie rule
(step 2), the confidence γ and its denominator Σ log N_i (step 4), the squared-distance
clamp (step 1), the soft cross-entropy spec, and the argument checks of the label step and
of BalSCL (so every entry point refuses the same inputs with the same message).

It imports nothing of ``fastlt.kernels``: the labels and losses modules dispatch to the
kernels, the kernels build on these parts, and no import goes back (tests/test_layout.py).
``fastlt.method.labels`` and ``fastlt.method.losses`` re-export every public name here.
"""
from __future__ import annotations

from numbers import Integral

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlt.method.config import LABEL_NORMALIZATIONS as NORMALIZATIONS

__all__ = ["NORMALIZATIONS", "area_label", "confidence", "reference_soft_cross_entropy", "resolve_supcon_args",
           "sum_log_counts", "topk_mask", "validate_rectify_args"]

# Squared distances are clamped here before the reciprocal square root, so that a sample
# sitting exactly on a center gets a large finite similarity instead of inf (which would
# turn the L1 normalisation into nan).
_MIN_SQ_DIST = 1e-12


def area_label(label_a: Tensor, label_b: Tensor, lam: Tensor, num_classes: int) -> Tensor:
    """CutMix area label y = λ·onehot(a) + (1−λ)·onehot(b) as a float32 (B, C) tensor.

    ``lam`` is the weight of ``label_a`` (the background class). When a == b the row is
    onehot(a), as it should be (the two terms are added, not overwritten).
    """
    lam = lam.to(torch.float32)
    y = torch.zeros(label_a.shape[0], num_classes, dtype=torch.float32, device=label_a.device)
    y.scatter_add_(1, label_a.view(-1, 1).long(), lam.view(-1, 1))
    y.scatter_add_(1, label_b.view(-1, 1).long(), (1.0 - lam).view(-1, 1))
    return y


def sum_log_counts(class_counts) -> Tensor:
    """Σ_{i=1..C} log N_i, γ's denominator (step 4), as a float64 0-d tensor on the counts' device.

    It depends on the class counts only, so compute it once per run and pass it to
    :func:`rectify_labels` (or ``fastlt.kernels.rectify_labels_compact``) as ``log_count_sum``.
    """
    counts = torch.as_tensor(class_counts)
    return torch.log(counts.to(torch.float64)).sum()


def _log_count_sum(log_count_sum, class_counts: Tensor, device) -> Tensor:
    """The float64 0-d Σ log N_i on ``device``: the precomputed value, or computed now."""
    if log_count_sum is None:
        return sum_log_counts(class_counts.to(device))
    return torch.as_tensor(log_count_sum, dtype=torch.float64, device=device).reshape(())


def confidence(y: Tensor, class_counts: Tensor, omega: float, log_count_sum: Tensor | float | None = None) -> Tensor:
    """γ = ω · log(Σ_j N_j y_j) / Σ_{i=1..C} log N_i for each row of the label y (B, C).

    ``log_count_sum``: Σ log N_i precomputed with :func:`sum_log_counts` (None: computed here).
    """
    counts = class_counts.to(device=y.device, dtype=torch.float64)
    mixed_count = y.to(torch.float64) @ counts
    gamma = omega * torch.log(mixed_count) / _log_count_sum(log_count_sum, counts, y.device)
    return gamma.to(torch.float32)


def validate_rectify_args(z: Tensor, centers: Tensor, label_a: Tensor, label_b: Tensor, lam: Tensor,
                          class_counts: Tensor, topk: int, normalize: str, temperature: float,
                          log_count_sum: Tensor | float | None = None) -> None:
    """Raise ValueError, saying how to fix it, for arguments that do not fit together."""
    if z.dim() != 2 or centers.dim() != 2:
        raise ValueError(f"rectify_labels: z must be (B, D) and centers (C, D); got z {tuple(z.shape)} "
                         f"and centers {tuple(centers.shape)}")
    if z.shape[1] != centers.shape[1]:
        raise ValueError(f"rectify_labels: z has D={z.shape[1]} but centers have D={centers.shape[1]}; "
                         "both must come from the same projection head")
    b, c = z.shape[0], centers.shape[0]
    for name, t in (("label_a", label_a), ("label_b", label_b), ("lam", lam)):
        if t.shape != (b,):
            raise ValueError(f"rectify_labels: {name} must have shape ({b},) to match z; got {tuple(t.shape)}")
    if class_counts.shape != (c,):
        raise ValueError(f"rectify_labels: class_counts must have one entry per center ({c}); "
                         f"got shape {tuple(class_counts.shape)}")
    if not isinstance(topk, int) or topk < 1:
        raise ValueError(f"rectify_labels: topk must be a positive int; got {topk!r}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"rectify_labels: normalize must be one of {NORMALIZATIONS}; got {normalize!r}")
    if normalize == "softmax" and not temperature > 0:
        raise ValueError(f"rectify_labels: temperature must be > 0 for softmax normalisation; got {temperature!r}")
    if log_count_sum is not None:
        if isinstance(log_count_sum, Tensor):
            if log_count_sum.numel() != 1 or not log_count_sum.is_floating_point():
                raise ValueError("rectify_labels: log_count_sum must be one floating-point value, "
                                 "fastlt.method.labels.sum_log_counts(class_counts); got a tensor of shape "
                                 f"{tuple(log_count_sum.shape)} and dtype {log_count_sum.dtype}")
        elif isinstance(log_count_sum, bool) or not isinstance(log_count_sum, (int, float)):
            raise ValueError("rectify_labels: log_count_sum must be a tensor or a number "
                             f"(fastlt.method.labels.sum_log_counts(class_counts)); got {type(log_count_sum).__name__}")


def topk_mask(s: Tensor, k: int) -> Tensor:
    """Boolean mask of the k largest entries per row, ties broken towards the lower index.

    ``torch.topk`` leaves the choice among equal values unspecified, so only its k-th value
    is used: everything above it is kept, and entries equal to it are kept in index order
    until k are chosen. This is deterministic (the Triton kernel reproduces it exactly) and
    several times cheaper on the CPU than a stable sort of the whole row.
    """
    kth = torch.topk(s, k, dim=1).values[:, -1:]
    above = s > kth
    at = s == kth
    room = k - above.sum(1, keepdim=True)
    return above | (at & (at.cumsum(1) <= room))


def reference_soft_cross_entropy(logits: Tensor, target: Tensor, bias: Tensor | None = None) -> Tensor:
    """−Σ_j target_j · log softmax(logits + bias)_j, averaged over the batch (fp32 math)."""
    x = logits.float()
    if bias is not None:
        x = x + bias.to(x.device, torch.float32)
    return -(target.float() * F.log_softmax(x, dim=1)).sum(1).mean()


def resolve_supcon_args(items: Tensor, item_labels: Tensor, num_classes: int, temperature: float,
                        anchor_start: int, num_anchors: int | None) -> int:
    """Check the arguments of :func:`balanced_supcon_loss` (ValueError saying how to fix them)
    and return the number of anchors (``num_anchors``, or all rows from ``anchor_start`` up to
    the C center rows at the end)."""
    what = "balanced_supcon_loss"
    if items.dim() != 2 or not items.is_floating_point():
        raise ValueError(f"{what}: items must be a floating-point (N, D) tensor of L2-normalised views and "
                         f"centers; got shape {tuple(items.shape)} and dtype {items.dtype}")
    n = items.shape[0]
    if item_labels.shape != (n,) or item_labels.is_floating_point() or item_labels.dtype == torch.bool:
        raise ValueError(f"{what}: item_labels must be an integer tensor of shape ({n},), one class per item; "
                         f"got shape {tuple(item_labels.shape)} and dtype {item_labels.dtype}")
    if item_labels.device != items.device:
        raise ValueError(f"{what}: item_labels are on {item_labels.device} but items on {items.device}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, Integral) or num_classes < 1:
        raise ValueError(f"{what}: num_classes must be a positive int; got {num_classes!r}")
    if not temperature > 0:
        raise ValueError(f"{what}: temperature must be > 0; got {temperature!r}")
    if isinstance(anchor_start, bool) or not isinstance(anchor_start, Integral) or anchor_start < 0:
        raise ValueError(f"{what}: anchor_start must be an int >= 0; got {anchor_start!r}")
    if num_anchors is None:
        num_anchors = n - num_classes - anchor_start
        if num_anchors < 1:
            raise ValueError(f"{what}: with num_anchors=None the anchors are rows anchor_start={anchor_start} up to "
                             f"the {num_classes} center rows at the end, but items has only {n} rows; pass "
                             "num_anchors explicitly")
    elif isinstance(num_anchors, bool) or not isinstance(num_anchors, Integral) or num_anchors < 1:
        raise ValueError(f"{what}: num_anchors must be a positive int (or None); got {num_anchors!r}")
    if anchor_start + num_anchors > n:
        raise ValueError(f"{what}: anchors items[{anchor_start}:{anchor_start + num_anchors}] run past the {n} "
                         "items; lower anchor_start or num_anchors")
    # Checking the label range costs a host sync on CUDA, so only CPU tensors are checked (not
    # while Dynamo traces); on CUDA an out-of-range label makes the loss NaN (Triton path) or
    # trips a device assertion (PyTorch path).
    if items.device.type == "cpu" and not torch.compiler.is_compiling():
        lo, hi = (int(v) for v in torch.aminmax(item_labels))
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{what}: item_labels has values in [{lo}, {hi}], outside the {num_classes} classes "
                             f"[0, {num_classes})")
    return int(num_anchors)
