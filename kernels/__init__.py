"""Triton kernels for fastlt, installed as ``fastlt.kernels`` (see setup.py's package_dir).

docs/design.md §3, "Kernel contract": every kernel has a pure-PyTorch reference in the library
(the spec), a parity test under ``TRITON_INTERPRET=1`` and a benchmark in ``bench/``; the
backend is chosen in one place, :func:`select_backend`.

* ``fastlt.method.labels.rectify_labels`` → :mod:`fastlt.kernels.rectify` (fused similarity, then
  :mod:`fastlt.kernels.select`: radix top-K, normalisation, γ and blend; §1 steps 1–5);
* ``fastlt.method.losses.soft_cross_entropy`` (used by ``LogitAdjustedCrossEntropy`` for soft
  targets) → :mod:`fastlt.kernels.soft_ce` (fused logit-adjusted soft CE, online softmax,
  the gradient written by the forward launch);
* ``fastlt.method.losses.balanced_supcon_loss`` (used by ``BalancedSupConLoss``) →
  :mod:`fastlt.kernels.balscl` (fused BalSCL over one contrast set and a range of anchor
  rows, the single-process and the distributed form; forward and backward);
* :func:`rectify_labels_compact` / :func:`soft_cross_entropy_compact` — the label as K
  indices and weights plus (γ, a, b, λ), so no B×C label exists between the two steps.

Tooling: :mod:`fastlt.kernels.aot` compiles every kernel for a GPU architecture without a
GPU (``python -m fastlt.kernels.aot --arch 90``); :mod:`fastlt.kernels.testing` runs the
parity tests in Triton's interpreter on CPU and counts kernel launches per call.

Importing this package does not import triton: the kernel modules are imported only once
:func:`select_backend` has chosen Triton, so users without triton can ``import fastlt``.
"""
from .compact import CompactLabel, rectify_labels_compact, reference_rectify_labels_compact, soft_cross_entropy_compact
from .dispatch import BACKENDS, ENV_VAR, interpreter_active, select_backend

__all__ = ["BACKENDS", "ENV_VAR", "CompactLabel", "interpreter_active", "rectify_labels_compact",
           "reference_rectify_labels_compact", "select_backend", "soft_cross_entropy_compact"]
