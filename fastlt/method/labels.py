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

The pieces of the steps (area label, top-K mask, γ, the argument checks) are in
:mod:`fastlt.method.parts`, shared with the kernels, and re-exported here.
:func:`reference_rectify_labels` is the pure-PyTorch specification;
:func:`rectify_labels` is the public entry point and the single dispatch point where the
Triton kernel of ``fastlt.kernels`` plugs in.
"""
from __future__ import annotations

import torch
from torch import Tensor

# The step helpers live in fastlt.method.parts (which the kernels use too); re-exported here.
from fastlt.method.parts import (_MIN_SQ_DIST, NORMALIZATIONS, area_label, confidence, sum_log_counts, topk_mask,
                                 validate_rectify_args)

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
    # Imported here: importing fastlt.method must not import the kernels (or triton).
    from fastlt.kernels.dispatch import select_backend

    if select_backend(z.device) == "triton":
        from fastlt.kernels.rectify import rectify_labels_triton

        return rectify_labels_triton(z, centers, label_a, label_b, lam, class_counts, topk=topk, omega=omega,
                                     normalize=normalize, temperature=temperature, log_count_sum=log_count_sum)
    return reference_rectify_labels(z, centers, label_a, label_b, lam, class_counts, topk=topk, omega=omega,
                                    normalize=normalize, temperature=temperature, log_count_sum=log_count_sum)
