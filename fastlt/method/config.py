"""The ``method`` section of the config: ConCutMix + BCL hyper-parameters (docs/design.md §1) and
their option lists. ``fastlt.method.labels`` (the rectified label), ``fastlt.method.losses`` (LA-CE, BalSCL)
and ``fastlt.method.objective`` (the training objective) implement what these settings describe.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fastlt.errors import ConfigError
from fastlt.config.typed import one_of, positive

__all__ = ["LABEL_NORMALIZATIONS", "MethodConfig", "REFERENCE_PARALLELISMS", "SCL_SCOPES"]

#: Normalisation of the top-K similarities: "l1" (ŝ = s / Σ_topK s, the reference) or "softmax".
LABEL_NORMALIZATIONS = ("l1", "softmax")
#: Contrast set of the balanced contrastive loss across ranks: "global" (the whole global batch,
#: as the reference's DataParallel) or "local" (each rank's share).
SCL_SCOPES = ("global", "local")
#: What the batch-coupled parts of the model reproduce: "none" (the paper's method: BatchNorm
#: over each rank's share, true class centres) or "dp4" (the published runs' nn.DataParallel on
#: four GPUs, exactly, at any world size).
REFERENCE_PARALLELISMS = ("none", "dp4")


@dataclass(kw_only=True)
class MethodConfig:
    """ConCutMix + BCL hyper-parameters (docs/design.md §1)."""

    alpha: float = 1.0
    """α, weight of the logit-adjusted cross-entropy in L = α·L_cls + β·L_BalSCL."""
    beta: float = 0.35
    """β, weight of the balanced supervised contrastive loss."""
    tau: float = 1.0
    """τ of the logit adjustment CE(x + τ·log π, target)."""
    l_d_warm: int = 0
    """Area labels while epoch <= l_d_warm (epochs counted from 0), rectified labels after."""
    scaling_factor: list[float] = field(default_factory=lambda: [200.0, 255.0])
    """[a, b] with ω = a / b, the confidence scale of the rectified label (200/255 ImageNet-LT,
    1628/255 iNat18, 20/255 CIFAR-100-LT, 2/255 CIFAR-10-LT)."""
    topk: int = 30
    """K, the number of class similarities kept in the rectified label."""
    temperature: float = 0.07
    """Temperature of the balanced contrastive loss (0.07 ImageNet, 0.1 CIFAR)."""
    scl_scope: str = "global"
    """Contrast set of the balanced contrastive loss with several ranks: global (every rank's views
    gathered with gradients plus the centers: the reference's whole-batch loss) or local (each
    rank's own views only)."""
    label_normalize: str = "l1"
    """Normalisation of the top-K similarities: l1 (reference) or softmax."""
    label_temperature: float = 1.0
    """Temperature T of the softmax normalisation (label_normalize: softmax)."""
    cutmix_prob: float = 0.5
    """Probability of applying CutMix."""
    cutmix_per_sample: bool = False
    """False: one coin and one box per batch (reference behaviour); true: per sample."""
    cutmix_alpha: float = 1.0
    """λ0 ~ Beta(cutmix_alpha, cutmix_alpha)."""
    reference_parallelism: str = "none"
    """none: the paper's method. dp4: what the published runs computed with nn.DataParallel on
    four GPUs, at any world size — BatchNorm over DataParallel's four contiguous groups of the
    global batch [view 0, view 1, view 2] with group 0's running statistics (evaluation then
    uses view-0 statistics), and, with the plain Linear classifier (use_norm off, ResNet-32),
    the published centre head: the head applied to the 64 columns of the classifier weight,
    tiled to C rows (pseudo-centres, for BalSCL and the rectified label alike)."""

    def __post_init__(self):
        positive("method.alpha", self.alpha, allow_zero=True)
        positive("method.beta", self.beta, allow_zero=True)
        if self.alpha == 0 and self.beta == 0:
            raise ConfigError("method.alpha and method.beta are both 0: the loss would be identically zero")
        if self.l_d_warm < -1:
            raise ConfigError(f"method.l_d_warm: must be >= -1 (-1 rectifies from the first epoch); got {self.l_d_warm}")
        if len(self.scaling_factor) != 2 or self.scaling_factor[1] == 0:
            raise ConfigError(f"method.scaling_factor: must be [a, b] with b != 0 (ω = a / b); "
                              f"got {self.scaling_factor!r}")
        if self.omega < 0:
            raise ConfigError(f"method.scaling_factor: ω = a / b must be >= 0; got {self.scaling_factor!r}")
        positive("method.topk", self.topk)
        positive("method.temperature", self.temperature)
        one_of("method.label_normalize", self.label_normalize, LABEL_NORMALIZATIONS)
        one_of("method.scl_scope", self.scl_scope, SCL_SCOPES)
        one_of("method.reference_parallelism", self.reference_parallelism, REFERENCE_PARALLELISMS)
        positive("method.label_temperature", self.label_temperature)
        if not 0 <= self.cutmix_prob <= 1:
            raise ConfigError(f"method.cutmix_prob: must be in [0, 1]; got {self.cutmix_prob!r}")
        positive("method.cutmix_alpha", self.cutmix_alpha)

    @property
    def omega(self) -> float:
        """ω = scaling_factor[0] / scaling_factor[1]."""
        return float(self.scaling_factor[0]) / float(self.scaling_factor[1])
