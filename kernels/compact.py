"""The ConCutMix label in compact form, and the soft cross-entropy that consumes it.

docs/design.md §1 steps 1–5 give ŷ = γ·ŝ + (1 − γ)·y, where ŝ has only K non-zero entries
per row and y only two. :class:`CompactLabel` keeps exactly those pieces — the K kept class
indices and their weights ŝ, γ, and (label_a, label_b, λ) — so that the training step can go
from embeddings to the loss without a B×C label tensor: (B, K) indices and weights instead
of (B, C) floats, e.g. 30 instead of 1000 or 8142 entries per sample.

* :func:`rectify_labels_compact` — same arguments as ``fastlt.method.labels.rectify_labels``;
* :func:`soft_cross_entropy_compact` — L_cls = −(1/B) Σ_i Σ_j ŷ_ij log softmax(x_i + bias)_j,
  equal to ``fastlt.method.losses.reference_soft_cross_entropy(logits, label.to_dense(), bias)``.

Both dispatch through ``fastlt.kernels.select_backend``. The PyTorch paths are the specs:
:func:`reference_rectify_labels_compact` follows ``reference_rectify_labels`` step by step
(and is tested to reproduce it through :meth:`CompactLabel.to_dense`), and the reference loss
densifies the label.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from fastlt.method.parts import (_MIN_SQ_DIST, area_label, confidence, reference_soft_cross_entropy, topk_mask,
                                 validate_rectify_args)

from .dispatch import select_backend

__all__ = ["CompactLabel", "rectify_labels_compact", "reference_rectify_labels_compact",
           "soft_cross_entropy_compact"]


class CompactLabel(NamedTuple):
    """ŷ = γ·scatter(index, weight) + (1−γ)·(λ·onehot(label_a) + (1−λ)·onehot(label_b))."""

    index: Tensor
    """(B, K) int64 class indices kept by the top-K, distinct within a row (any order)."""
    weight: Tensor
    """(B, K) float32 normalised similarities ŝ at ``index``; each row sums to 1."""
    gamma: Tensor
    """(B,) float32 confidence γ."""
    label_a: Tensor
    """(B,) int64 background class a."""
    label_b: Tensor
    """(B,) int64 foreground class b."""
    lam: Tensor
    """(B,) float32 weight λ of label_a in the area label."""
    num_classes: int
    """C."""

    def to_dense(self) -> Tensor:
        """The (B, C) float32 label ŷ (for the PyTorch path and for checks)."""
        y = area_label(self.label_a, self.label_b, self.lam, self.num_classes)
        s_hat = torch.zeros_like(y).scatter_(1, self.index.long(), self.weight.float())
        g = self.gamma.float().unsqueeze(1)
        return g * s_hat + (1.0 - g) * y

    def nbytes(self) -> int:
        """Bytes held by the label's tensors (the dense label takes B·C·4)."""
        return sum(t.numel() * t.element_size() for t in self[:6])

    @classmethod
    def area(cls, label_a: Tensor, label_b: Tensor, lam: Tensor, num_classes: int) -> "CompactLabel":
        """The CutMix area label λ·onehot(a) + (1−λ)·onehot(b) itself (γ = 0), in compact form."""
        b = label_a.shape[0]
        return cls(label_a.long().view(b, 1), torch.ones(b, 1, device=label_a.device), lam.new_zeros(b).float(),
                   label_a.long(), label_b.long(), lam.float(), num_classes)

    def keep_area_where(self, keep: Tensor) -> "CompactLabel":
        """The same label with γ = 0 where ``keep`` (B,) is set: those rows are their area label."""
        return self._replace(gamma=torch.where(keep, torch.zeros_like(self.gamma), self.gamma))

    def candidates(self) -> tuple[Tensor, Tensor, Tensor]:
        """(classes, ŝ, y) at the only classes where ŷ can be non-zero — the K kept ones, then a
        and b — each (B, K + 2): ŷ = γ·ŝ + (1−γ)·y there and 0 elsewhere."""
        cls_ = torch.cat([self.index.long(), self.label_a.view(-1, 1), self.label_b.view(-1, 1)], dim=1)
        s_hat = ((cls_.unsqueeze(2) == self.index.long().unsqueeze(1)) * self.weight.float().unsqueeze(1)).sum(2)
        lam = self.lam.float().view(-1, 1)
        y = lam * (cls_ == self.label_a.view(-1, 1)) + (1.0 - lam) * (cls_ == self.label_b.view(-1, 1))
        return cls_, s_hat, y


@torch.no_grad()
def reference_rectify_labels_compact(z: Tensor, centers: Tensor, label_a: Tensor, label_b: Tensor, lam: Tensor,
                                     class_counts: Tensor, *, topk: int, omega: float, normalize: str = "l1",
                                     temperature: float = 1.0,
                                     log_count_sum: Tensor | float | None = None) -> CompactLabel:
    """PyTorch path: the steps of ``fastlt.method.labels.reference_rectify_labels`` (same selection,
    ``topk_mask``), stopping short of the (B, C) label. ``index`` is ascending in each row."""
    class_counts = torch.as_tensor(class_counts, device=z.device)
    validate_rectify_args(z, centers, label_a, label_b, lam, class_counts, topk, normalize, temperature,
                          log_count_sum)
    zf = z.detach().float()
    c = centers.detach().float()
    num_classes = c.shape[0]
    sq_norms = (zf * zf).sum(1, keepdim=True) + (c * c).sum(1).unsqueeze(0)
    sim = torch.addmm(sq_norms, zf, c.t(), alpha=-2.0).clamp_min(_MIN_SQ_DIST).rsqrt()
    k = min(topk, num_classes)
    keep = topk_mask(sim, k)  # the spec's selection, ties to the lower index
    # The K kept columns of each row in ascending order, without a host sync (no nonzero):
    # kept column j scores C − j > 0, dropped ones 0, so the top-K scores are the kept columns.
    score = keep * torch.arange(num_classes, 0, -1, device=sim.device)
    idx = torch.topk(score, k, dim=1).indices.sort(dim=1).values
    vals = sim.gather(1, idx)
    if normalize == "l1":
        weight = vals / vals.sum(1, keepdim=True)
    else:
        weight = torch.exp((vals - vals.max(1, keepdim=True).values) / temperature)
        weight = weight / weight.sum(1, keepdim=True)
    # γ exactly as the spec computes it; the dense area label is fine on this reference path.
    gamma = confidence(area_label(label_a, label_b, lam, c.shape[0]), class_counts, omega, log_count_sum)
    return CompactLabel(idx, weight, gamma, label_a.long(), label_b.long(), lam.float(), num_classes)


def rectify_labels_compact(z: Tensor, centers: Tensor, label_a: Tensor, label_b: Tensor, lam: Tensor,
                           class_counts: Tensor, *, topk: int, omega: float, normalize: str = "l1",
                           temperature: float = 1.0, log_count_sum: Tensor | float | None = None) -> CompactLabel:
    """The rectified label ŷ as a :class:`CompactLabel`; arguments as ``fastlt.method.labels.rectify_labels``
    (``log_count_sum``: Σ log N_i from ``fastlt.method.labels.sum_log_counts``, computed once per run)."""
    if select_backend(z.device) == "triton":
        from .rectify import rectify_labels_compact_triton

        index, weight, gamma = rectify_labels_compact_triton(z, centers, label_a, label_b, lam, class_counts,
                                                             topk=topk, omega=omega, normalize=normalize,
                                                             temperature=temperature, log_count_sum=log_count_sum)
        return CompactLabel(index, weight, gamma, label_a.to(z.device, torch.int64),
                            label_b.to(z.device, torch.int64), lam.to(z.device, torch.float32), centers.shape[0])
    return reference_rectify_labels_compact(z, centers, label_a, label_b, lam, class_counts, topk=topk, omega=omega,
                                            normalize=normalize, temperature=temperature,
                                            log_count_sum=log_count_sum)


def _validate_compact(logits: Tensor, label: CompactLabel) -> None:
    if not isinstance(label, CompactLabel):
        raise ValueError(f"soft_cross_entropy_compact: label must be a CompactLabel; got {type(label).__name__}")
    if logits.dim() != 2 or logits.shape[1] != label.num_classes:
        raise ValueError(f"soft_cross_entropy_compact: logits must be (B, {label.num_classes}); "
                         f"got {tuple(logits.shape)}")
    b = logits.shape[0]
    if label.index.dim() != 2 or label.index.shape[0] != b or label.weight.shape != label.index.shape:
        raise ValueError(f"soft_cross_entropy_compact: index and weight must both be ({b}, K); got "
                         f"{tuple(label.index.shape)} and {tuple(label.weight.shape)}")
    for name in ("gamma", "label_a", "label_b", "lam"):
        t = getattr(label, name)
        if t.shape != (b,):
            raise ValueError(f"soft_cross_entropy_compact: {name} must be ({b},); got {tuple(t.shape)}")
    # Range checks cost a host sync on CUDA, so they run on CPU only; the CUDA kernel never
    # dereferences an out-of-range index and returns NaN for such rows instead.
    if logits.device.type == "cpu" and not torch.compiler.is_compiling():
        c = label.num_classes
        for name in ("index", "label_a", "label_b"):
            t = getattr(label, name)
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= c):
                raise ValueError(f"soft_cross_entropy_compact: {name} has values in [{int(t.min())}, "
                                 f"{int(t.max())}], outside the {c} classes [0, {c})")


def soft_cross_entropy_compact(logits: Tensor, label: CompactLabel, bias: Tensor | None = None) -> Tensor:
    """−(1/B) Σ_i Σ_j ŷ_ij · log softmax(logits_i + bias)_j with ŷ given compactly.

    Gradients flow to ``logits`` only (the label is a detached target, as in ConCutMix).
    """
    _validate_compact(logits, label)
    if select_backend(logits.device) == "triton":
        from .soft_ce_compact import soft_cross_entropy_compact_triton

        return soft_cross_entropy_compact_triton(logits, label.index, label.weight, label.gamma, label.label_a,
                                                 label.label_b, label.lam, bias)
    return reference_soft_cross_entropy(logits, label.to_dense().to(logits.device), bias)
