"""Losses of ConCutMix / BCL (docs/design.md §1, "Losses"): L = α·L_cls + β·L_BalSCL.

* :class:`LogitAdjustedCrossEntropy` — L_cls, CE(x + τ·log π, target) with a hard target
  (B,) or a soft target (B, C): −Σ_j ŷ_j · log softmax(x + τ·log π)_j, batch mean.
* :class:`BalancedSupConLoss` — L_BalSCL of BCL: anchors are the 2B normalised embeddings
  of the two contrastive views, the contrast set is those 2B plus the C normalised class
  centers, positives share the class (self excluded), every denominator term is divided
  by the number of items of its class in the anchor's contrast set (class-averaging),
  logits are divided by the temperature, and the loss is the mean over anchors.
* :func:`balanced_supcon_loss` — the same loss as a function of one contrast set of N
  items and a range of its rows as anchors, which is what the distributed ("global") form
  needs: the items are every rank's views followed by the centers, the anchors this rank's
  views. The module is a thin wrapper over it.

:func:`reference_soft_cross_entropy` (in :mod:`fastlt.method.parts`, shared with the kernels, as
is the BalSCL argument check) and :func:`reference_balanced_supcon_loss` are the pure-PyTorch
specs; :func:`soft_cross_entropy` and :func:`balanced_supcon_loss` are the dispatch points for
the fused Triton kernels of ``fastlt.kernels``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastlt.method.config import SCL_SCOPES
# Shared with the kernels (fastlt.method.parts imports none of them); re-exported here.
from fastlt.method.parts import reference_soft_cross_entropy, resolve_supcon_args

__all__ = ["BalancedSupConLoss", "LogitAdjustedCrossEntropy", "balanced_supcon_loss", "log_prior",
           "reference_balanced_supcon_loss", "reference_soft_cross_entropy", "resolve_supcon_args",
           "soft_cross_entropy"]


def _counts_tensor(class_counts, what: str) -> Tensor:
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"{what}: class_counts must be a non-empty 1-D sequence; got shape {tuple(counts.shape)}")
    if bool((counts <= 0).any()):
        bad = torch.nonzero(counts <= 0).flatten()[:5].tolist()
        raise ValueError(f"{what}: every class needs at least one training image; classes {bad} have none. "
                         "Fix the training list or num_classes.")
    return counts


def log_prior(class_counts, tau: float) -> Tensor:
    """τ·log π_j with π_j = N_j / Σ N, as float32 (C,)."""
    counts = _counts_tensor(class_counts, "log_prior")
    return (tau * torch.log(counts / counts.sum())).to(torch.float32)


def soft_cross_entropy(logits: Tensor, target: Tensor, bias: Tensor | None = None) -> Tensor:
    """Soft-target (logit-adjusted) cross-entropy; the dispatch point for the fused kernel."""
    # Imported here: importing fastlt.method must not import the kernels (or triton).
    from fastlt.kernels.dispatch import select_backend

    if select_backend(logits.device) == "triton":
        from fastlt.kernels.soft_ce import soft_cross_entropy_triton

        return soft_cross_entropy_triton(logits, target, bias)
    return reference_soft_cross_entropy(logits, target, bias)


class LogitAdjustedCrossEntropy(nn.Module):
    """CE(x + τ·log π, target) for a hard target (B,) of class indices, a soft target (B, C), or a
    ``fastlt.kernels.CompactLabel`` (the soft target in compact form)."""

    def __init__(self, class_counts, tau: float = 1.0):
        super().__init__()
        self.tau = float(tau)
        self.register_buffer("bias", log_prior(class_counts, tau), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.bias.numel()

    def forward(self, logits: Tensor, target) -> Tensor:
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"LogitAdjustedCrossEntropy: logits must be (B, {self.num_classes}); "
                             f"got {tuple(logits.shape)}")
        from fastlt.kernels.compact import CompactLabel  # imported here: fastlt.method imports no kernel up front

        if isinstance(target, CompactLabel):  # the ConCutMix label in compact form: no (B, C) label
            from fastlt.kernels.compact import soft_cross_entropy_compact

            return soft_cross_entropy_compact(logits, target, self.bias)
        if target.dim() == 1 and not target.is_floating_point():
            if target.shape[0] != logits.shape[0]:
                raise ValueError(f"LogitAdjustedCrossEntropy: hard target must be ({logits.shape[0]},); "
                                 f"got {tuple(target.shape)}")
            return F.cross_entropy(logits.float() + self.bias, target)
        if target.shape == logits.shape:
            return soft_cross_entropy(logits, target, self.bias)
        raise ValueError("LogitAdjustedCrossEntropy: target must be class indices (B,) of an integer dtype, "
                         f"a soft label (B, C) = {tuple(logits.shape)} or a fastlt.kernels.CompactLabel; got "
                         f"{tuple(target.shape)} of dtype {target.dtype}")


def reference_balanced_supcon_loss(items: Tensor, item_labels: Tensor, num_classes: int, temperature: float,
                                   anchor_start: int = 0, num_anchors: int | None = None) -> Tensor:
    """Pure-PyTorch specification of :func:`balanced_supcon_loss` (vectorised, no host sync).

    Materialises the (M, N) logits and masks; fp32 math at least (bf16/fp16 items are upcast,
    fp64 kept), the loss in that dtype.
    """
    m = resolve_supcon_args(items, item_labels, num_classes, temperature, anchor_start, num_anchors)
    device = items.device
    dtype = torch.promote_types(items.dtype, torch.float32)
    x = items.to(dtype)
    labels = item_labels.long()
    anchors = x[anchor_start: anchor_start + m]
    logits = anchors @ x.t() / temperature  # (M, N)
    # Subtracting the row max changes nothing mathematically and keeps exp() finite.
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    self_index = torch.arange(anchor_start, anchor_start + m, device=device)
    not_self = torch.arange(x.shape[0], device=device)[None, :] != self_index[:, None]
    same_class = labels[anchor_start: anchor_start + m, None] == labels[None, :]
    positive = same_class & not_self
    # Items per class in the full set, via scatter_add rather than bincount so that no
    # device-to-host sync is needed on CUDA.
    class_size = torch.zeros(num_classes, device=device, dtype=dtype)
    class_size.scatter_add_(0, labels, torch.ones_like(labels, dtype=dtype))
    # The anchor is not in its own contrast set, so its class counts one item fewer there
    # (the self entry itself is masked out of the sum).
    per_item_count = class_size[labels].unsqueeze(0) - same_class.to(dtype)
    exp_logits = torch.exp(logits) * not_self
    denom = (exp_logits / per_item_count.masked_fill(~not_self, 1.0)).sum(dim=1, keepdim=True)
    log_prob = logits - torch.log(denom)
    mean_log_prob_pos = (positive * log_prob).sum(1) / positive.sum(1)
    return -mean_log_prob_pos.mean()


def balanced_supcon_loss(items: Tensor, item_labels: Tensor, num_classes: int, temperature: float,
                         anchor_start: int = 0, num_anchors: int | None = None) -> Tensor:
    """BCL's balanced supervised contrastive loss over one contrast set (docs/design.md §1, L_BalSCL).

    Args:
        items: (N, D) L2-normalised contrast items: the 2·B·W views of all W ranks (or the 2B
            views of one process), then the C class centers.
        item_labels: (N,) int class of each item.
        num_classes: C (labels are in [0, C)).
        temperature: T > 0; logits are anchor·itemᵀ / T.
        anchor_start, num_anchors: the anchors are ``items[anchor_start:anchor_start + num_anchors]``
            (this rank's 2B views); ``num_anchors=None``: every row from ``anchor_start`` up to
            the C center rows at the end.

    For each anchor i: the contrast set is every item but i itself; each denominator term
    exp(l_ik) is divided by the number of items of class y_k in that set (the class size over
    all N items, minus one when y_k = y_i); the positives are the other items of class y_i;
    loss_i = −mean over positives of (l_ik − log Σ_k exp(l_ik)/n_ik). Returns the mean of
    loss_i over the given anchors, a 0-d fp32 tensor (fp64 for fp64 items). Gradients flow to
    all of ``items`` (as anchors and as contrast items). An anchor with no positive makes the
    loss NaN.

    The one dispatch point for this loss: the fused Triton kernel of ``fastlt.kernels.balscl``
    for CUDA tensors, the PyTorch reference otherwise (``FASTLT_KERNELS`` to override).
    """
    # Imported here: importing fastlt.method must not import the kernels (or triton).
    from fastlt.kernels.dispatch import select_backend

    if select_backend(items.device) == "triton":
        from fastlt.kernels.balscl import balanced_supcon_loss_triton

        return balanced_supcon_loss_triton(items, item_labels, num_classes, temperature, anchor_start, num_anchors)
    return reference_balanced_supcon_loss(items, item_labels, num_classes, temperature, anchor_start, num_anchors)


class BalancedSupConLoss(nn.Module):
    """BCL's balanced supervised contrastive loss (no Python loop, no host sync).

    Called as ``loss(centers, features, labels)`` with L2-normalised ``centers`` (C, D),
    L2-normalised ``features`` (B, 2, D) of the two contrastive views and ``labels`` (B,):
    :func:`balanced_supcon_loss` over items = [view 1s, view 2s, centers] with this process's
    2B views as anchors.

    ``scope="global"`` (the default; ``method.scl_scope``): when ``torch.distributed`` runs with
    W > 1 ranks, every rank's features and labels are gathered (with gradients) and the contrast
    set is all 2B·W views plus the C centers, class-averaged over that whole set, as the
    reference's ``nn.DataParallel`` computes it on the whole batch; the loss is the mean over
    this rank's anchors. With data-parallel gradient averaging this is exactly the full-batch
    loss and gradient. ``scope="local"`` contrasts each rank's own batch only. In one process
    the two are the same.
    """

    def __init__(self, class_counts, temperature: float = 0.1, scope: str = "global"):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"BalancedSupConLoss: temperature must be > 0; got {temperature!r}")
        if scope not in SCL_SCOPES:
            raise ValueError(f"BalancedSupConLoss: scope must be one of {SCL_SCOPES}; got {scope!r}")
        self.num_classes = int(_counts_tensor(class_counts, "BalancedSupConLoss").numel())
        self.temperature = float(temperature)
        self.scope = scope
        self.register_buffer("center_labels", torch.arange(self.num_classes), persistent=False)

    def forward(self, centers: Tensor, features: Tensor, labels: Tensor) -> Tensor:
        from fastlt.training import distributed as dist

        if features.dim() != 3 or features.shape[1] != 2:
            raise ValueError(f"BalancedSupConLoss: features must be (B, 2, D); got {tuple(features.shape)}")
        if centers.shape != (self.num_classes, features.shape[2]):
            raise ValueError(f"BalancedSupConLoss: centers must be ({self.num_classes}, {features.shape[2]}); "
                             f"got {tuple(centers.shape)}")
        if labels.shape != (features.shape[0],):
            raise ValueError(f"BalancedSupConLoss: labels must be ({features.shape[0]},); got {tuple(labels.shape)}")
        b, d, c = features.shape[0], features.shape[2], self.num_classes
        # Mixed dtypes compute in the wider of the features' dtype and fp32.
        dtype = features.dtype if centers.dtype == features.dtype else torch.promote_types(features.dtype,
                                                                                           torch.float32)
        rank, world = 0, 1
        if self.scope == "global" and dist.world_size() > 1:
            rank, world = torch.distributed.get_rank(), dist.world_size()
            features = dist.all_gather_with_grad(features)
            labels = dist.all_gather_tensor(labels)
        # Contrast set: per rank, its view 1s then its view 2s (so this rank's 2B anchors are one
        # contiguous range), then the C centers. transpose + reshape: one copy forward, views
        # backward, where two selects would cost a zero-filled buffer and a copy each.
        views = features.reshape(world, b, 2, d).transpose(1, 2).reshape(world * 2 * b, d).to(dtype)
        items = torch.cat([views, centers.to(dtype)], dim=0)
        item_labels = torch.cat([labels.reshape(world, 1, b).expand(world, 2, b).reshape(-1),
                                 self.center_labels.to(labels.device)]).long()
        return balanced_supcon_loss(items, item_labels, c, self.temperature, rank * 2 * b, 2 * b)
