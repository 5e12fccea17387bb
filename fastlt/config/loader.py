"""The training configuration: the sections of every component assembled into one typed
:class:`Config`, loaded from YAML recipes.

Every hyper-parameter of docs/design.md §1–2 has a field (α, β, τ, l_d_warm, ω as
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
from fastlt.paths import expect_file, path_problem, read_regular
from fastlt.method.config import MethodConfig
from fastlt.models.config import ModelConfig, check_input_size
from fastlt.pipelines.spec import PipelineConfig
from fastlt.training.schedule import OptimConfig
from fastlt.config.epochs import rescale_epochs
from fastlt.config.run import COMPILE_MODES, RunConfig
from fastlt.config.typed import Problems, build_section, flat_keys as _flat_keys, load_yaml, set_dotted

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
    "rescale_epochs",
    "save_config",
    "save_resolved_config",
]

#: The key of a recipe file that names the recipe it extends.
BASE_KEY = "base"


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
        if self.method.reference_parallelism == "dp4":
            for key in ("sync_bn", "freeze_bn"):
                if getattr(self.model, key):
                    raise ConfigError(f"model.{key}: method.reference_parallelism=dp4 normalises each of the published "
                                      f"runs' four DataParallel groups on its own; set model.{key}=false or "
                                      "method.reference_parallelism=none")
            if not self.model.use_norm and self.model.backbone != "resnet32":
                raise ConfigError(f"model.use_norm: with method.reference_parallelism=dp4 a plain Linear classifier "
                                  f"is the reference's ResNet-32 centre head; {self.model.backbone} needs "
                                  "model.use_norm=true (the reference's other models cannot run without it)")

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
        value = load_yaml(raw, f"override {text!r}") if raw.strip() else ""
    except ConfigError as e:
        raise ConfigError(f"{e} (the value after '=' is read as YAML)") from None
    return key.split("."), value


def _merge_tree(base: dict, top: dict) -> dict:
    """``top`` over ``base``: nested mappings merge key by key, every other value replaces."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge_tree(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path) -> dict:
    expect_file(path, "config file", error=ConfigError,
                missing=f"config file {path} does not exist; recipes live in configs/, e.g. configs/demo.yaml")
    try:
        raw = read_regular(path)
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line} is not UTF-8 ({e.reason} at byte {e.start}); save the file as UTF-8"
                          ) from None
    tree = load_yaml(text, str(path)) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model, data, ...)")
    return tree


def read_recipe(path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> dict:
    """A recipe file as a nested dict, with its ``base:`` chain resolved.

    ``base: other.yaml`` (resolved relative to the file that names it) loads that recipe first
    and merges this file's sections over it, key by key; a base may have a base of its own.
    A chain that comes back to a file already in it is an error.
    """
    if (problem := path_problem(path)) is not None:
        raise ConfigError(f"config file {os.fspath(path)!r} cannot be a path: {problem}")
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
    expect_file(target, f"{path}: '{BASE_KEY}: {base}' names", error=ConfigError,
                missing=f"{path}: '{BASE_KEY}: {base}' names {target}, which does not exist (a base is resolved "
                        "relative to the file that names it)")
    return _merge_tree(read_recipe(target, (*_chain, path)), tree)


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = (), *,
                epochs: int | None = None, notes: list[str] | None = None) -> Config:
    """Read a YAML recipe (or start from the defaults when path is None), rescale it to ``epochs``
    (:func:`rescale_epochs`, before the overrides, so an override still wins) and apply the
    overrides. ``notes``, when given, receives what ``epochs`` changed."""
    tree: dict = read_recipe(path) if path is not None else {}
    if epochs is not None:
        changed = rescale_epochs(tree, epochs)
        if notes is not None:  # a key --set also gives keeps the --set value: say so next to the rescaled one
            given = {t.split("=", 1)[0].strip(): t.split("=", 1)[1].strip() for t in overrides if "=" in t}
            notes.extend(f"{c} (--set wins: {given[c.split(':')[0]]})" if c.split(":")[0] in given else c
                         for c in changed)
    problems = Problems()  # every bad override and every bad value of the result in one message

    def override(text):
        parts, value = parse_override(text)
        if parts == [BASE_KEY]:
            raise ConfigError(f"override {text!r}: '{BASE_KEY}' is a key of recipe files, not a config value; "
                              "name the recipe with --config instead")
        set_dotted(Config, tree, parts, value, text)

    for text in overrides:
        problems.check(override, text)
    cfg = problems.check(config_from_dict, tree)
    problems.raise_if_any()
    if not cfg.run.name and path is not None:
        cfg.run.name = Path(path).stem
    return cfg


def save_resolved_config(cfg: Config, path: str | os.PathLike) -> list[str]:
    """Write ``cfg`` to ``path`` (a run's config.yaml); returns what changed against the config
    already there ('key: old -> new', empty for a new run or the same config)."""
    path = Path(path)
    changed = []
    if path.is_file():
        try:  # the checks of a recipe: a damaged or crafted config.yaml is replaced, not walked
            old = load_yaml(read_regular(path).decode("utf-8-sig"), str(path)) or {}
        except (ConfigError, OSError, UnicodeDecodeError):
            old = {}
        changed = config_diff(old, config_to_dict(cfg)) if isinstance(old, dict) else []
        if changed:  # keep the earlier launch's config, named by when that launch wrote it
            import time

            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
            history = path.parent / "config_history"
            history.mkdir(exist_ok=True)
            kept = history / f"config-{stamp}.yaml"
            n = 1
            while kept.exists():
                n += 1
                kept = history / f"config-{stamp}-{n}.yaml"
            os.replace(path, kept)  # the file itself: what that launch wrote, byte for byte
    save_config(cfg, path)
    return changed


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically: temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)
