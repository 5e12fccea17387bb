"""Typed training configuration: one dataclass per section, loaded from YAML recipes.

Every hyper-parameter of ARCHITECTURE §1–2 has a field here (α, β, τ, l_d_warm, ω as
``scaling_factor``, K, temperatures, D, use_norm, the LR schedule, DeepSpeed settings), so a
recipe file in ``configs/`` is a complete, reviewable description of a run.

* ``load_config(path, overrides)`` reads a YAML file, applies dotted ``key=value``
  overrides (values parsed as YAML: ``optim.lr=0.05``, ``optim.milestones=[160,180]``) and
  returns a validated :class:`Config`.
* Unknown keys and wrong types raise :class:`ConfigError`, naming the key and the closest
  valid keys (difflib), never silently ignored (a misspelt ``l_d_wram`` would otherwise
  change the method without a word).
* ``save_config(cfg, path)`` writes the resolved configuration into the run directory.

Sections: ``model``, ``data`` (with ``data.synthetic``), ``method``, ``optim``,
``deepspeed``, ``pipeline``, ``run``.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fastlt.models import BACKBONES

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "DeepSpeedSection",
    "MethodConfig",
    "ModelConfig",
    "OptimConfig",
    "PipelineConfig",
    "RunConfig",
    "SyntheticConfig",
    "config_from_dict",
    "config_to_dict",
    "flat_keys",
    "load_config",
    "parse_override",
    "save_config",
]

DATA_KINDS = ("list", "cifar", "synthetic")
CIFAR_NAMES = ("cifar10", "cifar100")
IMB_TYPES = ("exp", "step")
AUG_RECIPES = ("imagenet", "cifar")
NORMALIZATIONS = ("imagenet", "inat", "cifar")
SAMPLERS = ("uniform", "balanced", "reverse", "sqrt")
LABEL_NORMALIZE = ("l1", "softmax")
SCHEDULES = ("cos", "step")
PRECISIONS = ("fp32", "bf16", "fp16")
BACKENDS = ("auto", "torch", "dali")
DEVICES = ("auto", "cpu", "cuda")
ON_ERROR = ("raise", "skip")


class ConfigError(ValueError):
    """A configuration problem; the message names the key, the value and how to fix it."""


def _one_of(key: str, value, allowed) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(str, allowed))}{hint}")


def _positive(key: str, value, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}; got {value!r}")


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class ModelConfig:
    """The BCL model (ARCHITECTURE §1, "Model (BCL)")."""

    backbone: str = "resnet32"
    """Backbone name: resnet32 (CIFAR), resnet50, resnext50_32x4d, resnext101_32x4d,
    vit_small_patch16_224, vit_base_patch16_224."""
    feat_dim: int = 128
    """D, the contrastive projection dimension (1024 ImageNet/iNat/Places, 128 CIFAR)."""
    use_norm: bool = False
    """Cosine NormedLinear classifier (scale 30) when true; plain Linear when false (CIFAR)."""
    hidden_dim: int | None = None
    """m, hidden width of the two MLP heads; null = 512 for resnet32, h otherwise."""
    backbone_kwargs: dict = field(default_factory=dict)
    """Extra keyword arguments for the timm backbone (e.g. {img_size: 224} for ViT)."""
    channels_last: bool = False
    """Run convolutions in channels-last memory format (faster on recent GPUs)."""

    def __post_init__(self):
        _one_of("model.backbone", self.backbone, BACKBONES)
        _positive("model.feat_dim", self.feat_dim)
        if self.hidden_dim is not None:
            _positive("model.hidden_dim", self.hidden_dim)
        if self.backbone == "resnet32" and self.backbone_kwargs:
            raise ConfigError(f"model.backbone_kwargs: resnet32 takes no options; got {self.backbone_kwargs!r}. "
                              "Remove model.backbone_kwargs.")


@dataclass(kw_only=True)
class SyntheticConfig:
    """The synthetic long-tailed JPEG dataset (fastlt.data.make_synthetic_lt), cached on disk."""

    num_classes: int = 20
    """Number of classes (shape × colour), at most 144."""
    imb_factor: float = 0.02
    """n_min / n_max of the exponential profile (0.01 is "IF 100")."""
    n_max: int = 250
    """Training images of the largest class."""
    image_size: int = 40
    """Side of the generated JPEGs in pixels."""
    n_val: int = 20
    """Validation images per class (balanced)."""
    seed: int = 0
    """Seed of the generator (the dataset is a pure function of these parameters)."""

    def __post_init__(self):
        _positive("data.synthetic.num_classes", self.num_classes)
        if not 0 < self.imb_factor <= 1:
            raise ConfigError(f"data.synthetic.imb_factor: must be in (0, 1] (n_min / n_max); got {self.imb_factor!r}")
        _positive("data.synthetic.n_max", self.n_max)
        if self.image_size < 8:
            raise ConfigError(f"data.synthetic.image_size: must be >= 8; got {self.image_size!r}")
        _positive("data.synthetic.n_val", self.n_val)
        _positive("data.synthetic.seed", self.seed, allow_zero=True)


@dataclass(kw_only=True)
class DataConfig:
    """Where the images come from and how they are turned into batches (ARCHITECTURE §1, §2)."""

    kind: str = "list"
    """"list" (ImageNet-LT / iNat18 / Places-LT list files), "cifar" (CIFAR-LT from the python
    pickle batches) or "synthetic" (generated once and cached under data.root)."""
    root: str = ""
    """Dataset root: list paths are relative to it; the folder holding cifar-10-batches-py /
    cifar-100-python; or the cache folder of the synthetic dataset. Relative paths are
    resolved against the working directory."""
    train_list: str = ""
    """Training list file (kind "list"), relative to data.root unless absolute."""
    val_list: str = ""
    """Validation list file (kind "list"), evaluated every run.eval_every epochs."""
    test_list: str = ""
    """Optional test list file (kind "list"), used by `fastlt eval --split test`."""
    num_classes: int = 0
    """C. Must match the dataset: training labels must lie in [0, C) and every class needs a
    training image. 0 = take it from the dataset (synthetic and CIFAR only)."""
    cifar: str = "cifar100"
    """cifar10 or cifar100 (kind "cifar")."""
    imb_factor: float = 0.01
    """n_min / n_max of the CIFAR-LT profile (0.01 = IF 100, 0.02 = IF 50, 0.1 = IF 10)."""
    imb_type: str = "exp"
    """CIFAR-LT profile: exp or step (ARCHITECTURE §2)."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """Parameters of the synthetic dataset (kind "synthetic")."""
    augment_recipe: str = "imagenet"
    """View recipe of ARCHITECTURE §1: imagenet (RandomResizedCrop + RandAugment / sim views)
    or cifar (pad-crop + AutoAugment / RandomResizedCrop + blur)."""
    image_size: int = 224
    """Side of the square training and evaluation views."""
    normalization: str = "imagenet"
    """Mean/std of ARCHITECTURE §2: imagenet, inat or cifar."""
    batch_size: int = 256
    """Global batch per micro-step over all ranks (split evenly); the optimizer sees
    batch_size × deepspeed.grad_accum_steps images per step."""
    eval_batch_size: int = 256
    """Per-rank batch size for evaluation."""
    background_sampler: str = "uniform"
    """Background (canvas) stream: uniform, balanced, reverse or sqrt."""
    foreground_sampler: str = "balanced"
    """Foreground (patch) stream: balanced, reverse, uniform or sqrt."""
    randaugment: bool = True
    """RandAugment n=2 m=10 on the classification view (imagenet recipe)."""
    on_error: str = "raise"
    """A missing or corrupt image: raise (name the file) or skip (use another image of its class)."""

    def __post_init__(self):
        _one_of("data.kind", self.kind, DATA_KINDS)
        _one_of("data.cifar", self.cifar, CIFAR_NAMES)
        _one_of("data.imb_type", self.imb_type, IMB_TYPES)
        _one_of("data.augment_recipe", self.augment_recipe, AUG_RECIPES)
        _one_of("data.normalization", self.normalization, NORMALIZATIONS)
        _one_of("data.background_sampler", self.background_sampler, SAMPLERS)
        _one_of("data.foreground_sampler", self.foreground_sampler, SAMPLERS)
        _one_of("data.on_error", self.on_error, ON_ERROR)
        _positive("data.num_classes", self.num_classes, allow_zero=True)
        if self.num_classes == 1:
            raise ConfigError("data.num_classes: must be >= 2 (or 0 to take it from the dataset); got 1")
        if not 0 < self.imb_factor <= 1:
            raise ConfigError(f"data.imb_factor: must be in (0, 1] (n_min / n_max); got {self.imb_factor!r}")
        if self.image_size < 8:
            raise ConfigError(f"data.image_size: must be >= 8; got {self.image_size!r}")
        _positive("data.batch_size", self.batch_size)
        _positive("data.eval_batch_size", self.eval_batch_size)
        if self.kind == "list":
            for key in ("root", "train_list", "val_list"):
                if not getattr(self, key):
                    raise ConfigError(f"data.{key}: required when data.kind is 'list'. Example: "
                                      "--set data.root=/datasets/ImageNet --set data.train_list=ImageNet_LT_train.txt "
                                      "--set data.val_list=ImageNet_LT_val.txt")
            if self.num_classes == 0:
                raise ConfigError("data.num_classes: required when data.kind is 'list' (e.g. 1000 for ImageNet-LT, "
                                  "8142 for iNaturalist 2018, 365 for Places-LT)")
        if self.kind in ("cifar", "synthetic") and not self.root:
            raise ConfigError(f"data.root: required when data.kind is {self.kind!r}; "
                              + ("the folder that holds cifar-10-batches-py / cifar-100-python"
                                 if self.kind == "cifar" else "a cache folder such as data_cache/synthetic"))

    def path(self, name: str) -> Path:
        """A list file resolved against data.root (absolute paths are kept)."""
        p = Path(getattr(self, name))
        return p if p.is_absolute() else Path(self.root) / p


@dataclass(kw_only=True)
class MethodConfig:
    """ConCutMix + BCL hyper-parameters (ARCHITECTURE §1)."""

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

    def __post_init__(self):
        _positive("method.alpha", self.alpha, allow_zero=True)
        _positive("method.beta", self.beta, allow_zero=True)
        if self.alpha == 0 and self.beta == 0:
            raise ConfigError("method.alpha and method.beta are both 0: the loss would be identically zero")
        if self.l_d_warm < -1:
            raise ConfigError(f"method.l_d_warm: must be >= -1 (-1 rectifies from the first epoch); got {self.l_d_warm}")
        if len(self.scaling_factor) != 2 or self.scaling_factor[1] == 0:
            raise ConfigError(f"method.scaling_factor: must be [a, b] with b != 0 (ω = a / b); "
                              f"got {self.scaling_factor!r}")
        if self.omega < 0:
            raise ConfigError(f"method.scaling_factor: ω = a / b must be >= 0; got {self.scaling_factor!r}")
        _positive("method.topk", self.topk)
        _positive("method.temperature", self.temperature)
        _one_of("method.label_normalize", self.label_normalize, LABEL_NORMALIZE)
        _positive("method.label_temperature", self.label_temperature)
        if not 0 <= self.cutmix_prob <= 1:
            raise ConfigError(f"method.cutmix_prob: must be in [0, 1]; got {self.cutmix_prob!r}")
        _positive("method.cutmix_alpha", self.cutmix_alpha)

    @property
    def omega(self) -> float:
        """ω = scaling_factor[0] / scaling_factor[1]."""
        return float(self.scaling_factor[0]) / float(self.scaling_factor[1])


@dataclass(kw_only=True)
class OptimConfig:
    """SGD and the per-epoch learning-rate schedule (ARCHITECTURE §2)."""

    epochs: int = 200
    """Training epochs."""
    lr: float = 0.1
    """Peak learning rate."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """L2 weight decay (applied to every parameter, as in the reference code)."""
    nesterov: bool = False
    """Nesterov momentum."""
    schedule: str = "cos"
    """cos: cosine to 0 over the epochs after warm-up; step: ×gamma at each milestone."""
    warmup_epochs: int = 0
    """Linear warm-up: epoch e < warmup_epochs uses lr·(e+1)/warmup_epochs."""
    milestones: list[int] = field(default_factory=list)
    """Epochs at which the step schedule multiplies the LR by gamma (e.g. [160, 180])."""
    gamma: float = 0.1
    """Factor of the step schedule."""

    def __post_init__(self):
        _positive("optim.epochs", self.epochs)
        _positive("optim.lr", self.lr)
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"optim.momentum: must be in [0, 1); got {self.momentum!r}")
        _positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        _one_of("optim.schedule", self.schedule, SCHEDULES)
        _positive("optim.warmup_epochs", self.warmup_epochs, allow_zero=True)
        if self.warmup_epochs >= self.epochs:
            raise ConfigError(f"optim.warmup_epochs ({self.warmup_epochs}) must be < optim.epochs ({self.epochs})")
        if sorted(self.milestones) != list(self.milestones) or any(m <= 0 for m in self.milestones):
            raise ConfigError(f"optim.milestones: must be increasing positive epochs; got {self.milestones!r}")
        if self.schedule == "step" and not self.milestones:
            raise ConfigError("optim.milestones: the step schedule needs milestones, e.g. [160, 180]")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"optim.gamma: must be in (0, 1]; got {self.gamma!r}")
        if self.nesterov and self.momentum == 0:
            raise ConfigError("optim.nesterov: Nesterov momentum needs optim.momentum > 0")


@dataclass(kw_only=True)
class DeepSpeedSection:
    """DeepSpeed engine settings; turned into DeepSpeed's config dict by fastlt.train."""

    precision: str = "fp32"
    """fp32, bf16 or fp16."""
    autocast: bool = True
    """With bf16/fp16: true = torch autocast with fp32 weights (BatchNorm stays fp32; DeepSpeed's
    torch_autocast); false = DeepSpeed's bf16/fp16 mode (low-precision weights, fp32 master copy)."""
    zero_stage: int = 0
    """ZeRO stage 0, 1 or 2 (optimizer state / gradient partitioning)."""
    grad_accum_steps: int = 1
    """Micro-steps per optimizer step."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value; 0 = no clipping."""
    loss_scale_power: int = 16
    """fp16 without autocast: initial dynamic loss scale 2**loss_scale_power."""
    extra: dict = field(default_factory=dict)
    """Merged last into DeepSpeed's config dict (expert use; e.g. {"zero_optimization": {"overlap_comm": true}})."""

    def __post_init__(self):
        _one_of("deepspeed.precision", self.precision, PRECISIONS)
        _one_of("deepspeed.zero_stage", self.zero_stage, (0, 1, 2))
        _positive("deepspeed.grad_accum_steps", self.grad_accum_steps)
        _positive("deepspeed.grad_clip", self.grad_clip, allow_zero=True)
        _positive("deepspeed.loss_scale_power", self.loss_scale_power, allow_zero=True)


@dataclass(kw_only=True)
class PipelineConfig:
    """Which data pipeline backend produces the batches (ARCHITECTURE §3, pipeline contract)."""

    backend: str = "auto"
    """auto (DALI when it imports, else torch), torch or dali; an explicit request that cannot be met is an error."""
    num_workers: int = 4
    """Decoding/augmentation worker processes (or threads, for DALI) per rank."""
    extra: dict = field(default_factory=dict)
    """Backend-specific options, passed through to the pipeline spec."""

    def __post_init__(self):
        _one_of("pipeline.backend", self.backend, BACKENDS)
        _positive("pipeline.num_workers", self.num_workers, allow_zero=True)


@dataclass(kw_only=True)
class RunConfig:
    """Run bookkeeping: where outputs go, logging, evaluation and checkpoints."""

    name: str = ""
    """Run name; the run directory is output_dir/name. Empty = the config file's stem."""
    output_dir: str = "runs"
    """Parent folder of run directories."""
    seed: int = 0
    """Seed of the samplers, augmentations and initialisation (per rank: seed + rank where needed)."""
    device: str = "auto"
    """auto (CUDA when available), cpu or cuda."""
    deterministic: bool = False
    """Deterministic algorithms (torch.use_deterministic_algorithms); slower, for reproducibility checks."""
    log_every: int = 50
    """Steps between log lines; the host syncs with the device only at these intervals."""
    eval_every: int = 5
    """Evaluate every eval_every epochs (and always after the last one)."""
    checkpoint_every: int = 1
    """Write a resumable checkpoint every checkpoint_every epochs (and after the last one)."""
    keep_last: int = 2
    """Resumable checkpoints kept; older ones are deleted once a newer one is complete."""
    max_steps_per_epoch: int = 0
    """Cap on steps per epoch (smoke tests and quick experiments); 0 = the full epoch."""
    progress_bar: bool = True
    """tqdm bar on rank 0, only when stdout is a terminal."""

    def __post_init__(self):
        _one_of("run.device", self.device, DEVICES)
        _positive("run.seed", self.seed, allow_zero=True)
        _positive("run.log_every", self.log_every)
        _positive("run.eval_every", self.eval_every)
        _positive("run.checkpoint_every", self.checkpoint_every)
        _positive("run.keep_last", self.keep_last)
        _positive("run.max_steps_per_epoch", self.max_steps_per_epoch, allow_zero=True)
        if self.name and (os.sep in self.name or self.name in (".", "..")):
            raise ConfigError(f"run.name: must be a plain folder name without '{os.sep}'; got {self.name!r}")


@dataclass(kw_only=True)
class Config:
    """A complete training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The BCL model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Datasets, views, batch size and samplers."""
    method: MethodConfig = field(default_factory=MethodConfig)
    """ConCutMix / BCL hyper-parameters."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and LR schedule."""
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    """DeepSpeed engine."""
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    """Data pipeline backend."""
    run: RunConfig = field(default_factory=RunConfig)
    """Outputs, logging, evaluation, checkpoints."""

    def __post_init__(self):
        # Cross-section checks: each names both keys involved.
        if self.data.augment_recipe == "cifar" and self.data.image_size != 32:
            raise ConfigError(f"data.image_size: the cifar view recipe works on 32 px images; got "
                              f"{self.data.image_size}. Set data.image_size=32 or data.augment_recipe=imagenet")
        if self.data.kind == "cifar" and self.data.augment_recipe != "cifar":
            raise ConfigError("data.augment_recipe: CIFAR data needs the cifar view recipe; set data.augment_recipe=cifar")
        ds = self.deepspeed
        if self.model.channels_last and (ds.zero_stage > 0 or (ds.precision != "fp32" and not ds.autocast)):
            raise ConfigError("model.channels_last: needs deepspeed.zero_stage 0 and fp32 or autocast precision "
                              "(ZeRO and DeepSpeed's bf16/fp16 mode keep parameters in flat contiguous buffers); "
                              f"got zero_stage {ds.zero_stage}, precision {ds.precision}, autocast {ds.autocast}")
        if self.optim.milestones and self.optim.milestones[-1] >= self.optim.epochs and self.optim.schedule == "step":
            raise ConfigError(f"optim.milestones: {self.optim.milestones} reaches past optim.epochs "
                              f"({self.optim.epochs}); milestones must be < epochs")

    @property
    def num_classes(self) -> int:
        """C as far as the config alone knows it (0 if it must come from the dataset)."""
        if self.data.num_classes:
            return self.data.num_classes
        if self.data.kind == "synthetic":
            return self.data.synthetic.num_classes
        if self.data.kind == "cifar":
            return 10 if self.data.cifar == "cifar10" else 100
        return 0


# --------------------------------------------------------------------------------------
# dict <-> dataclass with strict key and type checking
# --------------------------------------------------------------------------------------


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def flat_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted key of the config tree (sections and leaves), e.g. 'optim.lr'."""
    keys = []
    for name, tp in _field_types(cls).items():
        key = f"{prefix}{name}"
        keys.append(key)
        if dataclasses.is_dataclass(tp):
            keys.extend(flat_keys(tp, key + "."))
    return keys


def _unknown_key(key: str, valid_here: list[str]) -> ConfigError:
    all_keys = flat_keys()
    leaf = key.rsplit(".", 1)[-1]
    # Most likely first: the same name in another section ('optim.l_d_warm' -> 'method.l_d_warm'),
    # then a near spelling of the whole key, then a near spelling of the last part.
    same_leaf = [k for k in all_keys if k.rsplit(".", 1)[-1] == leaf]
    near_key = difflib.get_close_matches(key, all_keys, n=3, cutoff=0.8)
    near_leaves = set(difflib.get_close_matches(leaf, {k.rsplit(".", 1)[-1] for k in all_keys}, n=3, cutoff=0.7))
    near_leaf = [k for k in all_keys if k.rsplit(".", 1)[-1] in near_leaves]
    close = list(dict.fromkeys(same_leaf + near_key + near_leaf))[:3]
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint} (valid keys here: {', '.join(valid_here)})")


def _type_name(tp) -> str:
    if typing.get_origin(tp) is not None:  # list[float], int | None, ...
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp)


_FLOAT_LITERAL = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _coerce(key: str, value, tp):
    """Check ``value`` against the annotation ``tp``; return it (ints widened to float where asked)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 (PyYAML) reads 1e-4 (no dot) as a string; accept plain numeric literals only.
        if isinstance(value, str) and _FLOAT_LITERAL.match(value.strip()):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, (list, tuple)):
            return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif tp is Any:
        return value
    else:  # pragma: no cover - only reached if a field gets an unsupported annotation
        raise TypeError(f"config field {key} has an unsupported annotation {tp!r}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _build(cls, data, prefix: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "the config file"
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {data!r} ({type(data).__name__})")
    hints = _field_types(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in hints:
            raise _unknown_key(key, list(hints))
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key + ".")
        else:
            kwargs[name] = _coerce(key, value, tp)
    return cls(**kwargs)


def config_from_dict(data: dict) -> Config:
    """Build and validate a :class:`Config` from a nested dict (e.g. parsed YAML)."""
    return _build(Config, data, "")


def config_to_dict(cfg) -> dict:
    """The nested plain-dict form of a config (what save_config writes)."""
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split 'a.b.c=value' into (['a', 'b', 'c'], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. --set optim.lr=0.05")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: the key {key!r} is not a dotted key such as optim.lr")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value {raw!r} is not valid YAML ({e.problem})") from None
    return key.split("."), value


def _apply_override(tree: dict, parts: list[str], value, text: str) -> None:
    node, cls = tree, Config
    for depth, part in enumerate(parts):
        hints = _field_types(cls)
        key = ".".join(parts[: depth + 1])
        if part not in hints:
            raise _unknown_key(key, list(hints))
        tp = hints[part]
        if depth == len(parts) - 1:
            node[part] = value
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"override {text!r}: {key} is a value, not a section; it has no key {parts[depth + 1]!r}")
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{key}: expected a mapping, got {child!r}")
        node, cls = child, tp


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML recipe (or start from the defaults when path is None) and apply overrides."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; recipes live in configs/, e.g. configs/demo.yaml")
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model, data, ...)")
    for text in overrides:
        parts, value = parse_override(text)
        _apply_override(tree, parts, value, text)
    cfg = config_from_dict(tree)
    if not cfg.run.name and path is not None:
        cfg.run.name = Path(path).stem
    return cfg


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically: temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)
