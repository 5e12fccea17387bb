"""ConCutMix's semantically consistent label (docs/design.md §1, steps 1–5).

The CutMix area label y = λ·onehot(a) + (1−λ)·onehot(b) is rectified with the similarity
between the mixed sample's (unnormalised, detached) contrastive embedding z and the
(unnormalised, detached) class centers c:

1. s_j = 1 / ‖z − c_j‖₂, computed from ‖z‖² + ‖c_j‖² − 2 z·c_j (no B×C×D tensor);
2. keep the K largest s_j, zero the rest (ties: the lower class index wins);
3. ŝ = s / Σ_topK s (``l1``) or softmax of the top-K s/T (``softmax``);
4. γ = ω · log(Σ_j N_j y_j) / Σ_i log N_i;
5. ŷ = γ·ŝ + (1 − γ)·y.

Σ_i log N_i depends on the class counts only: :func:`sum_log_counts` computes it once per run,
and every entry point takes it as ``log_count_sum`` (None: computed on each call).

:func:`reference_rectify_labels` is the pure-PyTorch specification;
:func:`rectify_labels` is the public entry point and the single dispatch point where the
Triton kernel of ``fastlt.kernels`` plugs in.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastlt.method.config import LABEL_NORMALIZATIONS as NORMALIZATIONS

__all__ = [
    "NORMALIZATIONS",
    "area_label",
    "confidence",
    "rectify_labels",
    "reference_rectify_labels",
    "sum_log_counts",
    "topk_mask",
    "validate_rectify_args",
]

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


@torch.no_grad()
def reference_rectify_labels(z: Tensor, centers: Tensor, label_a: Tensor, label_b: Tensor, lam: Tensor,
                             class_counts: Tensor, *, topk: int, omega: float, normalize: str = "l1",
                             temperature: float = 1.0, log_count_sum: Tensor | float | None = None) -> Tensor:
    """Pure-PyTorch specification of the ConCutMix label (docs/design.md §1, steps 1–5).

    Args:
        z: (B, D) unnormalised contrastive embeddings of the mixed samples (any float dtype).
        centers: (C, D) unnormalised class centers.
        label_a, label_b: (B,) int background / foreground classes.
        lam: (B,) weight of ``label_a`` in the area label.
        class_counts: (C,) training images per class (all > 0).
        topk: K, the number of similarities kept (K ≥ C keeps all of them).
        omega: ω = scaling_factor[0] / scaling_factor[1].
        normalize: ``"l1"`` (reference behaviour) or ``"softmax"`` (with ``temperature``).
        log_count_sum: Σ_i log N_i from :func:`sum_log_counts`, computed once per run (None:
            computed from ``class_counts`` on every call).

    Returns:
        (B, C) float32 rectified label ŷ; each row sums to 1. No gradient flows to z or centers.
    """
    class_counts = torch.as_tensor(class_counts, device=z.device)
    validate_rectify_args(z, centers, label_a, label_b, lam, class_counts, topk, normalize, temperature,
                          log_count_sum)
    z = z.detach().float()
    c = centers.detach().float()
    # ||z||^2 + ||c||^2 - 2 z.c in one fused addmm: no (B, C, D) tensor.
    sq_norms = (z * z).sum(1, keepdim=True) + (c * c).sum(1).unsqueeze(0)
    sq_dist = torch.addmm(sq_norms, z, c.t(), alpha=-2.0)
    sim = sq_dist.clamp_min(_MIN_SQ_DIST).rsqrt()
    keep = topk_mask(sim, min(topk, c.shape[0]))
    if normalize == "l1":
        s_hat = sim * keep
    else:
        # Max-subtraction over the kept entries only (the row max is always kept).
        logits = sim / temperature
        s_hat = torch.exp(logits - logits.max(1, keepdim=True).values) * keep
    s_hat = s_hat / s_hat.sum(1, keepdim=True)
    y = area_label(label_a, label_b, lam, c.shape[0])
    gamma = confidence(y, class_counts, omega, log_count_sum).unsqueeze(1)
    return gamma * s_hat + (1.0 - gamma) * y


def rectify_labels(z: Tensor, centers: Tensor, label_a: Tensor, label_b: Tensor, lam: Tensor,
                   class_counts: Tensor, *, topk: int, omega: float, normalize: str = "l1",
                   temperature: float = 1.0, log_count_sum: Tensor | float | None = None) -> Tensor:
    """The ConCutMix rectified label ŷ (B, C), float32; see :func:`reference_rectify_labels`.

    Pass ``log_count_sum=sum_log_counts(class_counts)``, computed once per run on the device of
    the embeddings, so that γ's denominator is not recomputed on every call (a Python number
    is accepted too, but is copied to the device on every call).

    This is the one dispatch point for the label step: the backend (Triton for CUDA tensors,
    PyTorch otherwise, ``FASTLT_KERNELS`` to override) is chosen by ``fastlt.kernels``.
    """
    # Imported here: fastlt.kernels imports this module.
    from fastlt.kernels.dispatch import select_backend

    if select_backend(z.device) == "triton":
        from fastlt.kernels.rectify import rectify_labels_triton

        return rectify_labels_triton(z, centers, label_a, label_b, lam, class_counts, topk=topk, omega=omega,
                                     normalize=normalize, temperature=temperature, log_count_sum=log_count_sum)
    return reference_rectify_labels(z, centers, label_a, label_b, lam, class_counts, topk=topk, omega=omega,
                                    normalize=normalize, temperature=temperature, log_count_sum=log_count_sum)
