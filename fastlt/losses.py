"""Losses of ConCutMix / BCL (ARCHITECTURE §1, "Losses"): L = α·L_cls + β·L_BalSCL.

* :class:`LogitAdjustedCrossEntropy` — L_cls, CE(x + τ·log π, target) with a hard target
  (B,) or a soft target (B, C): −Σ_j ŷ_j · log softmax(x + τ·log π)_j, batch mean.
* :class:`BalancedSupConLoss` — L_BalSCL of BCL: anchors are the 2B normalised embeddings
  of the two contrastive views, the contrast set is those 2B plus the C normalised class
  centers, positives share the class (self excluded), every denominator term is divided
  by the number of items of its class in the anchor's contrast set (class-averaging),
  logits are divided by the temperature, and the loss is the mean over anchors.

:func:`reference_soft_cross_entropy` is the pure-PyTorch spec of the soft-target term and
the dispatch point for the fused Triton kernel of ``fastlt.kernels``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BalancedSupConLoss", "LogitAdjustedCrossEntropy", "log_prior", "reference_soft_cross_entropy",
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


def reference_soft_cross_entropy(logits: Tensor, target: Tensor, bias: Tensor | None = None) -> Tensor:
    """−Σ_j target_j · log softmax(logits + bias)_j, averaged over the batch (fp32 math)."""
    x = logits.float()
    if bias is not None:
        x = x + bias.to(x.device, torch.float32)
    return -(target.float() * F.log_softmax(x, dim=1)).sum(1).mean()


def soft_cross_entropy(logits: Tensor, target: Tensor, bias: Tensor | None = None) -> Tensor:
    """Soft-target (logit-adjusted) cross-entropy; the dispatch point for the fused kernel."""
    # Imported here: fastlt.kernels imports this module.
    from fastlt.kernels.dispatch import select_backend

    if select_backend(logits.device) == "triton":
        from fastlt.kernels.soft_ce import soft_cross_entropy_triton

        return soft_cross_entropy_triton(logits, target, bias)
    return reference_soft_cross_entropy(logits, target, bias)


class LogitAdjustedCrossEntropy(nn.Module):
    """CE(x + τ·log π, target) for a hard target (B,) of class indices or a soft target (B, C)."""

    def __init__(self, class_counts, tau: float = 1.0):
        super().__init__()
        self.tau = float(tau)
        self.register_buffer("bias", log_prior(class_counts, tau), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.bias.numel()

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"LogitAdjustedCrossEntropy: logits must be (B, {self.num_classes}); "
                             f"got {tuple(logits.shape)}")
        if target.dim() == 1 and not target.is_floating_point():
            if target.shape[0] != logits.shape[0]:
                raise ValueError(f"LogitAdjustedCrossEntropy: hard target must be ({logits.shape[0]},); "
                                 f"got {tuple(target.shape)}")
            return F.cross_entropy(logits.float() + self.bias, target)
        if target.shape == logits.shape:
            return soft_cross_entropy(logits, target, self.bias)
        raise ValueError("LogitAdjustedCrossEntropy: target must be class indices (B,) of an integer dtype or "
                         f"a soft label (B, C) = {tuple(logits.shape)}; got {tuple(target.shape)} "
                         f"of dtype {target.dtype}")


class BalancedSupConLoss(nn.Module):
    """BCL's balanced supervised contrastive loss, vectorised (no Python loop, no host sync).

    Called as ``loss(centers, features, labels)`` with L2-normalised ``centers`` (C, D),
    L2-normalised ``features`` (B, 2, D) of the two contrastive views and ``labels`` (B,).
    """

    def __init__(self, class_counts, temperature: float = 0.1):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"BalancedSupConLoss: temperature must be > 0; got {temperature!r}")
        self.num_classes = int(_counts_tensor(class_counts, "BalancedSupConLoss").numel())
        self.temperature = float(temperature)

    def forward(self, centers: Tensor, features: Tensor, labels: Tensor) -> Tensor:
        if features.dim() != 3 or features.shape[1] != 2:
            raise ValueError(f"BalancedSupConLoss: features must be (B, 2, D); got {tuple(features.shape)}")
        if centers.shape != (self.num_classes, features.shape[2]):
            raise ValueError(f"BalancedSupConLoss: centers must be ({self.num_classes}, {features.shape[2]}); "
                             f"got {tuple(centers.shape)}")
        if labels.shape != (features.shape[0],):
            raise ValueError(f"BalancedSupConLoss: labels must be ({features.shape[0]},); got {tuple(labels.shape)}")
        b, c = features.shape[0], self.num_classes
        device = features.device
        # Contrast set: view 1 of every sample, view 2 of every sample, then the C centers.
        # fp32 at least (bf16/fp16 inputs under autocast), fp64 kept when given.
        dtype = torch.promote_types(features.dtype, torch.float32)
        items = torch.cat([features[:, 0], features[:, 1], centers], dim=0).to(dtype)
        item_labels = torch.cat([labels, labels, torch.arange(c, device=device)]).long()
        anchors = items[: 2 * b]
        logits = anchors @ items.t() / self.temperature  # (2B, 2B + C)
        # Subtracting the row max changes nothing mathematically and keeps exp() finite.
        logits = logits - logits.max(dim=1, keepdim=True).values.detach()

        not_self = torch.ones_like(logits, dtype=torch.bool)
        not_self[:, : 2 * b].fill_diagonal_(False)
        same_class = item_labels[: 2 * b, None] == item_labels[None, :]
        positive = same_class & not_self
        # Items per class in the full set (2 views per sample + one center), via scatter_add
        # rather than bincount so that no device-to-host sync is needed on CUDA.
        class_size = torch.zeros(c, device=device, dtype=dtype)
        class_size.scatter_add_(0, item_labels, torch.ones_like(item_labels, dtype=dtype))
        # The anchor is not in its own contrast set, so its class counts one item fewer there
        # (the self entry itself is masked out of the sum).
        per_item_count = class_size[item_labels].unsqueeze(0) - same_class.to(dtype)
        exp_logits = torch.exp(logits) * not_self
        denom = (exp_logits / per_item_count.masked_fill(~not_self, 1.0)).sum(dim=1, keepdim=True)
        log_prob = logits - torch.log(denom)
        mean_log_prob_pos = (positive * log_prob).sum(1) / positive.sum(1)
        return -mean_log_prob_pos.mean()
