"""BCL models (docs/design.md §1, "Model (BCL)").

backbone → feature h; then
* classifier: NormedLinear (logits = 30 · normalize(h) · normalize(W), cosine) or a plain
  Linear when ``use_norm`` is off (the CIFAR recipes);
* head: MLP(Linear h→m, BN, ReLU, Linear m→D) → z;
* center head: an MLP of the same shape applied to the classifier's per-class weight
  vectors (C × h) → class centers.

The model returns both the L2-normalised z / centers (for the contrastive loss) and the
unnormalised ones (for the ConCutMix label rectification).

``reference_parallelism="dp4"`` builds the published runs' four-GPU ``nn.DataParallel``
semantics into the model: BatchNorm over DataParallel's four groups of the 3B batch
(``fastlt.models.replica_bn``) and, with the plain Linear classifier of the CIFAR recipes, the
published ResNet-32 centre head. That head (``BCLModel_32`` in the reference's
``models/resnet32.py``) is applied to ``fc.weight.T``, the h = 64 *columns* of the (C × h)
classifier weight, so each replica returns 64 pseudo-centres; DataParallel concatenates the
four replicas' (identical) outputs to 256 rows and ``centers[:cls_num]`` keeps the first C
(for C = 100, rows 64–99 repeat rows 0–35). Those pseudo-centres feed the BalSCL loss and the
label rectification alike. With the cosine classifier (``use_norm``) ``weight.T`` holds the
classes' vectors and the centres are the true class centres, as here.

Backbones: ``resnet32`` (``fastlt.models.cifar_resnet``) and any timm model by name, with no
pretrained download (``fastlt.models.config.BACKBONES`` lists the published recipes' ones).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cifar_resnet import resnet32
from fastlt.errors import ConfigError

from .replica_bn import DP_REPLICAS, convert_replica_batchnorm, rank_world, replicas_used

__all__ = ["BCLModel", "BCLOutput", "NormedLinear", "build_backbone", "build_model", "check_backbone"]

NORMED_LINEAR_SCALE = 30.0


class BCLOutput(NamedTuple):
    logits: Tensor       # (N, C)
    z: Tensor            # (N, D) L2-normalised contrastive embedding
    z_raw: Tensor        # (N, D) unnormalised, used by the label rectification
    centers: Tensor      # (C, D) L2-normalised class centers
    centers_raw: Tensor  # (C, D) unnormalised


def check_backbone(name: str) -> None:
    """ConfigError unless ``name`` is resnet32 or a model timm can build (with a "did you mean")."""
    if name == "resnet32":
        return
    import difflib

    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, ["resnet32", *timm.list_models()], n=3, cutoff=0.75)
        hint = f"; did you mean {', '.join(close)}?" if close else " (timm.list_models() lists them)"
        raise ConfigError(f"model.backbone: {name!r} is neither resnet32 nor a timm model{hint}")
    arch, _, tag = name.partition(".")
    if tag:  # timm.is_model checks the architecture only; create_model refuses an unknown tag
        from timm.models import get_arch_pretrained_cfgs

        tags = list(get_arch_pretrained_cfgs(arch))
        if name not in tags:
            close = difflib.get_close_matches(name, tags, n=3, cutoff=0.6)
            hint = (f"; did you mean {', '.join(close)}?" if close else
                    f"; its tags: {', '.join(tags[:5])}{', ...' if len(tags) > 5 else ''}" if tags else
                    f"; it has none: use {arch!r}")
            raise ConfigError(f"model.backbone: {name!r}: timm has no tag {tag!r} for {arch}{hint}")


def build_backbone(name: str, **kwargs) -> tuple[nn.Module, int]:
    """Build a backbone by name; returns (module mapping images to (N, h) features, h).

    ``resnet32`` is the CIFAR ResNet-32; any other name is a timm model, built with
    ``pretrained=False`` (nothing is downloaded) and no classifier (``num_classes=0``), its
    feature width h read from the built model (``num_features``); extra kwargs (e.g.
    ``img_size`` for ViT) go to timm. timm's ResNet family (resnet*, resnext*, ...) keeps the
    reference initialisation: timm's default ``zero_init_last=True`` would start the last
    BatchNorm γ of every residual block at 0, the reference's torchvision-style ResNeXt keeps it
    at 1 (docs/design.md §1 "Model (BCL)").
    """
    if name == "resnet32":
        if kwargs:
            raise ValueError(f"resnet32 takes no backbone options; got {sorted(kwargs)}")
        net = resnet32()
        return net, net.num_features
    check_backbone(name)
    import timm  # imported lazily: timm is only needed for the ImageNet-size backbones
    from timm.models import model_entrypoint

    if model_entrypoint(name.split(".")[0]).__module__ == "timm.models.resnet":
        kwargs.setdefault("zero_init_last", False)
    net = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    return net, int(net.num_features)


class NormedLinear(nn.Module):
    """Cosine classifier: scale · normalize(x) · normalize(W), W of shape (in, out) as in BCL."""

    def __init__(self, in_features: int, out_features: int, scale: float = NORMED_LINEAR_SCALE):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.weight.data.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * F.normalize(x, dim=1).mm(F.normalize(self.weight, dim=0))

    def class_weights(self) -> Tensor:
        """Per-class weight vectors (C, in)."""
        return self.weight.t()


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_dim))


class BCLModel(nn.Module):
    """Backbone + classifier + contrastive head + center head (docs/design.md §1).

    Args:
        backbone: a name from :data:`BACKBONES` or a module mapping images to (N, h)
            features that has a ``num_features`` attribute.
        num_classes: C.
        feat_dim: D, the projection dimension (1024 ImageNet/iNat/Places, 128 CIFAR).
        use_norm: cosine NormedLinear classifier (True) or plain Linear (False, CIFAR).
        hidden_dim: m, the MLP hidden width; default 512 for ResNet-32 and h otherwise.
        freeze_bn: BatchNorm layers normalise with their running statistics and never update
            them, in training too (their affine weights still train): the usual choice when
            fine-tuning pretrained weights, and it makes the output of a sample independent of
            how the batch is split over ranks.
        reference_parallelism: "none" (the paper's semantics) or "dp4" (the published runs'
            four-GPU DataParallel: grouped BatchNorm and, without ``use_norm``, the pseudo-centre
            head of the reference's ResNet-32; module docstring).
        **backbone_kwargs: passed to :func:`build_backbone` (e.g. ``img_size`` for ViT).
    """

    def __init__(self, backbone: str | nn.Module, num_classes: int, feat_dim: int = 1024, use_norm: bool = True,
                 hidden_dim: int | None = None, freeze_bn: bool = False, reference_parallelism: str = "none",
                 **backbone_kwargs):
        super().__init__()
        if reference_parallelism not in ("none", "dp4"):
            raise ValueError(f"reference_parallelism must be 'none' or 'dp4'; got {reference_parallelism!r}")
        if reference_parallelism == "dp4" and freeze_bn:
            raise ValueError("reference_parallelism='dp4' groups the BatchNorm batch statistics, which freeze_bn "
                             "never uses; choose one")
        self.freeze_bn = freeze_bn
        self.reference_parallelism = reference_parallelism
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2; got {num_classes}")
        if feat_dim < 1:
            raise ValueError(f"feat_dim must be >= 1; got {feat_dim}")
        if isinstance(backbone, str):
            self.backbone_name = backbone
            self.backbone, h = build_backbone(backbone, **backbone_kwargs)
        else:
            h = getattr(backbone, "num_features", None)
            if not isinstance(h, int):
                raise ValueError("a backbone module must expose its feature width as an int `num_features`")
            self.backbone_name = type(backbone).__name__
            self.backbone = backbone
        if hidden_dim is None:
            hidden_dim = 512 if self.backbone_name == "resnet32" else h
        self.num_classes = num_classes
        self.feat_dim = feat_dim
        self.use_norm = use_norm
        self.fc = NormedLinear(h, num_classes) if use_norm else nn.Linear(h, num_classes)
        self.head = _mlp(h, hidden_dim, feat_dim)
        #: The published CIFAR centre head: the head on the h columns of the classifier weight.
        self.column_centres = reference_parallelism == "dp4" and not use_norm
        if self.column_centres:
            if self.backbone_name != "resnet32":
                raise ValueError("reference_parallelism='dp4' with a plain Linear classifier is the reference's "
                                 f"ResNet-32 model; its {self.backbone_name} model has no plain-Linear centre head "
                                 "that runs (use_norm=True, or backbone resnet32)")
            if num_classes > DP_REPLICAS * h:
                raise ValueError(f"reference_parallelism='dp4': the published centre head gives {DP_REPLICAS} × {h} "
                                 f"pseudo-centres, fewer than the {num_classes} classes")
            self.head_fc = _mlp(num_classes, hidden_dim, feat_dim)
            # DataParallel's concatenation of the replicas' h rows, cut to C: row j is row j mod h.
            self.register_buffer("centre_rows", torch.arange(num_classes) % h, persistent=False)
        else:
            self.head_fc = _mlp(h, hidden_dim, feat_dim)
        if reference_parallelism == "dp4":  # every replica normalises its own group; head_fc sees the weights
            convert_replica_batchnorm(self.backbone)
            convert_replica_batchnorm(self.head)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def class_weights(self) -> Tensor:
        """The classifier's per-class weight vectors (C, h), input of the center head."""
        return self.fc.class_weights() if self.use_norm else self.fc.weight

    def forward(self, x: Tensor) -> BCLOutput:
        feat = self.backbone(x)
        logits = self.fc(feat)
        z_raw = self.head(feat)
        if self.column_centres:
            centers_raw = self._column_centres(x.shape[0])
        else:
            centers_raw = self.head_fc(self.class_weights())
        return BCLOutput(logits, F.normalize(z_raw, dim=1), z_raw, F.normalize(centers_raw, dim=1), centers_raw)


    def _column_centres(self, rows: int) -> Tensor:
        """The published ResNet-32 centre head as four-GPU DataParallel returns it (module docstring)."""
        per_replica = self.head_fc(self.fc.weight.t())  # (h, D): one row per column of the (C × h) weight
        if self.training:
            _, world = rank_world()
            replicas = replicas_used(rows * world)
            if replicas * per_replica.shape[0] < self.num_classes:
                raise ValueError(f"reference_parallelism='dp4': a global batch of {rows * world} rows runs "
                                 f"{replicas} replicas, whose {replicas * per_replica.shape[0]} pseudo-centres "
                                 f"are fewer than the {self.num_classes} classes; raise data.batch_size")
        return per_replica[self.centre_rows]


def build_model(cfg, num_classes: int) -> nn.Module:
    """The BCL model of a :class:`fastlt.config.loader.Config` (its ``model`` section) for C classes;
    with ``model.sync_bn`` its BatchNorm layers synchronise their statistics over the ranks."""
    m = cfg.model
    model = BCLModel(m.backbone, num_classes, feat_dim=m.feat_dim, use_norm=m.use_norm, hidden_dim=m.hidden_dim,
                     freeze_bn=m.freeze_bn, reference_parallelism=cfg.method.reference_parallelism,
                     **m.backbone_kwargs)
    if m.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model
