"""``--epochs N``: a recipe rescaled to another length, every epoch-based key keeping its share."""
from __future__ import annotations

import math
from fractions import Fraction

from fastlt.config.run import RunConfig
from fastlt.errors import ConfigError
from fastlt.method.config import MethodConfig
from fastlt.training.schedule import OptimConfig

__all__ = ["rescale_epochs"]


def _half_up(x) -> int:
    # not round(): banker's rounding would turn 0.5 epochs into 0. x is a Fraction: exact for any
    # epoch count (a float ratio would round 10**20 epochs' warm-up to a neighbouring integer).
    return int(math.floor(x + Fraction(1, 2)))


def rescale_epochs(tree: dict, epochs: int) -> list[str]:
    """Shorten (or lengthen) a recipe to ``epochs`` epochs in place: every epoch-based key keeps its
    share of the run — warm-up, the step schedule's milestones, ``method.l_d_warm`` (the share of
    epochs with area labels) and the evaluation / checkpoint cadence. Returns 'key: old -> new'
    for each key it set."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"--epochs: must be a whole number >= 1; got {epochs!r}")
    optim, method, run = (tree.setdefault(k, {}) for k in ("optim", "method", "run"))
    if not all(isinstance(x, dict) for x in (optim, method, run)):
        raise ConfigError("--epochs: the optim, method and run sections must be mappings")
    old = optim.get("epochs", OptimConfig.epochs)
    if not isinstance(old, int) or old < 1:
        raise ConfigError(f"--epochs: optim.epochs of the recipe must be a whole number >= 1; got {old!r}")
    f = Fraction(epochs, old)
    new = {"optim.epochs": epochs}
    warm = optim.get("warmup_epochs", OptimConfig.warmup_epochs)
    if isinstance(warm, int):
        new["optim.warmup_epochs"] = min(_half_up(warm * f), epochs - 1)
    miles = optim.get("milestones")
    if isinstance(miles, list) and all(isinstance(m, int) for m in miles):
        if epochs == 1 and miles and optim.get("schedule", OptimConfig.schedule) == "step":
            # a milestone must lie inside the run (< epochs): a 1-epoch step schedule has none
            raise ConfigError(f"--epochs 1: the recipe's step schedule (optim.milestones {miles}) needs at least "
                              "2 epochs (a milestone must fall inside the run, 0 < m < epochs); use --epochs 2 "
                              "or more")
        new["optim.milestones"] = sorted({min(max(_half_up(m * f), 1), max(epochs - 1, 1)) for m in miles})
    warm_labels = method.get("l_d_warm", MethodConfig.l_d_warm)
    if isinstance(warm_labels, int) and warm_labels >= 0:
        # l_d_warm + 1 epochs use area labels: keep that share of the run (at least one epoch).
        new["method.l_d_warm"] = max(_half_up((warm_labels + 1) * f), 1) - 1
    for key, default in (("eval_every", RunConfig.eval_every), ("checkpoint_every", RunConfig.checkpoint_every)):
        every = run.get(key, default)
        if isinstance(every, int):
            new[f"run.{key}"] = max(_half_up(every * f), 1)
    defaults = {"optim.warmup_epochs": OptimConfig.warmup_epochs, "method.l_d_warm": MethodConfig.l_d_warm,
                "run.eval_every": RunConfig.eval_every, "run.checkpoint_every": RunConfig.checkpoint_every}
    changed = []
    for dotted, value in new.items():
        section, key = dotted.split(".")
        before = tree[section].get(key, defaults.get(dotted))  # a key the recipe leaves unset has its default
        if before != value:
            changed.append(f"{dotted}: {before!r} -> {value!r}")
        tree[section][key] = value
    return changed
