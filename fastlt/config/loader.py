"""The training configuration: the sections of every component assembled into one typed
:class:`Config`, loaded from YAML recipes.

Every hyper-parameter of ARCHITECTURE §1–2 has a field (α, β, τ, l_d_warm, ω as
``scaling_factor``, K, temperatures, D, use_norm, the LR schedule, DeepSpeed settings), so a
recipe file in ``configs/`` is a complete, reviewable description of a run. Each section is
declared by the component that owns it, with its option lists:

=============  =====================================  ========================================
section        class                                  declared in
=============  =====================================  ========================================
model          ModelConfig                            fastlt.models.config
data           DataConfig (+ SyntheticConfig)         fastlt.data.config
method         MethodConfig                           fastlt.method.config
optim          OptimConfig                            fastlt.training.schedule
deepspeed      DeepSpeedSection                       fastlt.training.engine
pipeline       PipelineConfig                         fastlt.pipelines.spec
run            RunConfig                              here
=============  =====================================  ========================================

* ``load_config(path, overrides)`` reads a YAML file, resolves its ``base:`` chain (see
  :func:`read_recipe`), applies dotted ``key=value`` overrides (values parsed as YAML:
  ``optim.lr=0.05``, ``optim.milestones=[160,180]``) and returns a validated :class:`Config`.
* Unknown keys and wrong types raise :class:`~fastlt.errors.ConfigError`, naming the key and
  the closest valid keys (``fastlt.config.typed``).
* ``save_config(cfg, path)`` writes the resolved configuration (no ``base:``) into the run
  directory.

Loading a config imports neither torch nor DeepSpeed.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fastlt.data.config import DataConfig, SyntheticConfig
from fastlt.training.engine import DeepSpeedSection
from fastlt.errors import ConfigError
from fastlt.method.config import MethodConfig
from fastlt.models.config import ModelConfig, check_input_size
from fastlt.pipelines.spec import PipelineConfig
from fastlt.training.schedule import OptimConfig
from fastlt.config.typed import build_section, flat_keys as _flat_keys, load_yaml, one_of, positive, set_dotted

__all__ = [
    "BASE_KEY",
    "COMPILE_MODES",
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
    "config_diff",
    "config_from_dict",
    "config_to_dict",
    "flat_keys",
    "load_config",
    "parse_override",
    "read_recipe",
    "save_config",
    "save_resolved_config",
]

#: ``run.device``: auto (CUDA when available), cpu or cuda.
DEVICES = ("auto", "cpu", "cuda")
#: ``run.compile``: off, or a torch.compile mode ("reduce-overhead" = CUDA graphs).
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: The key of a recipe file that names the recipe it extends.
BASE_KEY = "base"


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
    collective_timeout_s: float = 600.0
    """Several ranks: the longest a rank waits for the others in one collective before the job stops
    (torch's NCCL default; raise it only for collectives that are legitimately slower, e.g. a first
    step compiled at different speeds). A rank whose heartbeat stops for min(60 s, this) is dead, and
    every other rank exits with one line naming it and the latest checkpoint."""
    sample_log: bool = False
    """Every rank appends the dataset indices of each trained step to samples.rank<R>.jsonl in the
    run directory: an audit of which samples resumes and elastic restarts trained (see
    fastlt.training.sample_log)."""
    max_steps_per_epoch: int = 0
    """Cap on steps per epoch (smoke tests and quick experiments); 0 = the full epoch."""
    progress_bar: bool = True
    """tqdm bar on rank 0, only when stdout is a terminal."""
    compile: str = "off"
    """torch.compile the model and the objective: off, default, reduce-overhead (CUDA graphs;
    the shapes are static, the last partial batch being dropped), max-autotune or
    max-autotune-no-cudagraphs. The first steps pay the compilation."""
    compile_backend: str = "inductor"
    """torch.compile backend (inductor generates kernels; aot_eager traces the graphs without
    generating code, for checking that a step compiles)."""
    tensorboard: bool = True
    """Write TensorBoard event files into the run directory (rank 0): losses, lr, throughput,
    training accuracy, label diagnostics and evaluation; false turns them off."""

    def __post_init__(self):
        one_of("run.device", self.device, DEVICES)
        one_of("run.compile", self.compile, COMPILE_MODES)
        positive("run.seed", self.seed, allow_zero=True)
        positive("run.log_every", self.log_every)
        positive("run.eval_every", self.eval_every)
        positive("run.checkpoint_every", self.checkpoint_every)
        positive("run.keep_last", self.keep_last)
        positive("run.max_steps_per_epoch", self.max_steps_per_epoch, allow_zero=True)
        if not self.collective_timeout_s >= 1:
            raise ConfigError(f"run.collective_timeout_s: must be at least 1 (seconds); got {self.collective_timeout_s}")
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
            raise ConfigError(f"data.image_size: the cifar view recipe makes 32 px views (images of another size "
                              f"are resized to 32 first); got {self.data.image_size}. Set data.image_size=32 or "
                              f"data.augment_recipe=imagenet")
        if self.data.kind == "cifar" and self.data.augment_recipe != "cifar":
            raise ConfigError("data.augment_recipe: CIFAR data needs the cifar view recipe; set data.augment_recipe=cifar")
        check_input_size(self.model, self.data.image_size)

    @property
    def num_classes(self) -> int:
        """C as far as the config alone knows it (0 if it must come from the dataset)."""
        return self.data.num_classes_known


def flat_keys() -> list[str]:
    """Every dotted key of the config tree (sections and leaves), e.g. 'optim.lr'."""
    return _flat_keys(Config)


def config_from_dict(data: dict) -> Config:
    """Build and validate a :class:`Config` from a nested dict (e.g. parsed YAML)."""
    return build_section(Config, Config, data)


def config_to_dict(cfg) -> dict:
    """The nested plain-dict form of a config (what save_config writes)."""
    return dataclasses.asdict(cfg)


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'key: old -> new' for every leaf of ``new`` that differs from ``old`` (nested dicts)."""
    out = []
    for k in new:
        if isinstance(new[k], dict) and isinstance(old.get(k), dict):
            out += config_diff(old[k], new[k], f"{prefix}{k}.")
        elif old.get(k) != new[k]:
            out.append(f"{prefix}{k}: {old.get(k)!r} -> {new[k]!r}")
    return out


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


def _merge_tree(base: dict, top: dict) -> dict:
    """``top`` over ``base``: nested mappings merge key by key, every other value replaces."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge_tree(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; recipes live in configs/, e.g. configs/demo.yaml")
    tree = load_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model, data, ...)")
    return tree


def read_recipe(path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> dict:
    """A recipe file as a nested dict, with its ``base:`` chain resolved.

    ``base: other.yaml`` (resolved relative to the file that names it) loads that recipe first
    and merges this file's sections over it, key by key; a base may have a base of its own.
    A chain that comes back to a file already in it is an error.
    """
    path = Path(path).resolve()
    if path in _chain:
        cycle = " -> ".join(str(p.name) for p in (*_chain, path))
        raise ConfigError(f"{path}: 'base:' chain comes back to a file already in it ({cycle})")
    tree = _read_yaml(path)
    base = tree.pop(BASE_KEY, None)
    if base is None:
        return tree
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: '{BASE_KEY}:' must name a recipe file, e.g. {BASE_KEY}: cifar100_lt_if100.yaml; "
                          f"got {base!r}")
    target = path.parent / base
    if not target.is_file():
        raise ConfigError(f"{path}: '{BASE_KEY}: {base}' names {target}, which does not exist (a base is resolved "
                          "relative to the file that names it)")
    return _merge_tree(read_recipe(target, (*_chain, path)), tree)


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML recipe (or start from the defaults when path is None) and apply overrides."""
    tree: dict = read_recipe(path) if path is not None else {}
    for text in overrides:
        parts, value = parse_override(text)
        if parts == [BASE_KEY]:
            raise ConfigError(f"override {text!r}: '{BASE_KEY}' is a key of recipe files, not a config value; "
                              "name the recipe with --config instead")
        set_dotted(Config, tree, parts, value, text)
    cfg = config_from_dict(tree)
    if not cfg.run.name and path is not None:
        cfg.run.name = Path(path).stem
    return cfg


def save_resolved_config(cfg: Config, path: str | os.PathLike) -> list[str]:
    """Write ``cfg`` to ``path`` (a run's config.yaml); returns what changed against the config
    already there ('key: old -> new', empty for a new run or the same config)."""
    path = Path(path)
    changed = []
    if path.is_file():
        old = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        changed = config_diff(old, config_to_dict(cfg))
    save_config(cfg, path)
    return changed


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically: temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)
