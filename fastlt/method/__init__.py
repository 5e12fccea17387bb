"""The method: everything the ConCutMix paper (and BCL beneath it) defines.

* :mod:`~fastlt.method.config` — the ``method`` section: α, β, τ, ω, K, l_d_warm, temperature;
* :mod:`~fastlt.method.sampling` — the background (instance-uniform) and foreground
  (class-balanced) index streams, sharded step-major over ranks;
* :mod:`~fastlt.method.cutmix` — the CutMix box and its area label λ (pure functions);
* :mod:`~fastlt.method.labels` — **the semantically consistent label** (similarity to the class
  centres, top-K, normalisation, confidence γ, ŷ = γ·ŝ + (1 − γ)·y);
* :mod:`~fastlt.method.losses` — logit-adjusted soft cross-entropy and the balanced
  supervised contrastive loss (BalSCL);
* :mod:`~fastlt.method.parts` — the pieces of both that the Triton kernels share (area label,
  top-K mask, γ, argument checks), so the kernels never import the dispatch points;
* :mod:`~fastlt.method.objective` — L = α·L_cls + β·L_BalSCL and the training step;
* :mod:`~fastlt.method.label_stats` — what the label step did (γ, ‖ŷ − y‖₁, arg-max changes).

docs/design.md states each equation as implemented; the Triton fast paths are in
``fastlt.kernels``. Public names are re-exported here and imported on first use.
"""
from fastlt._lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "MethodConfig": "config",
    "make_sampler": "sampling", "steps_per_epoch": "sampling", "SAMPLER_KINDS": "sampling",
    "Box": "cutmix", "sample_box": "cutmix", "area_lambda": "cutmix",
    "area_label": "labels", "rectify_labels": "labels", "confidence": "labels",
    "LogitAdjustedCrossEntropy": "losses", "BalancedSupConLoss": "losses", "soft_cross_entropy": "losses",
    "balanced_supcon_loss": "losses",
    "ConCutMixObjective": "objective", "train_step": "objective",
})
