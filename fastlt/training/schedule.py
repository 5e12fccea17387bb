"""The ``optim`` section of the config: SGD and the per-epoch learning rate (docs/design.md §2).

* :class:`OptimConfig` — the section, with the schedule names;
* :func:`build_optimizer` — SGD over the model's parameters, as the reference trains;
* :class:`EpochLR` — the learning rate of an epoch: linear warm-up, then cosine to 0 or
  ×gamma at each milestone (the BCL reference's ``adjust_learning_rate``), set once per epoch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from fastlt.config.typed import Problems, one_of, positive

__all__ = ["EpochLR", "OptimConfig", "SCHEDULES", "build_optimizer"]

#: "cos": cosine to 0 after the warm-up; "step": ×gamma at each milestone.
SCHEDULES = ("cos", "step")


@dataclass(kw_only=True)
class OptimConfig:
    """SGD and the per-epoch learning-rate schedule (docs/design.md §2)."""

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
        # Every problem of the section in one message (shortening a recipe often breaks several).
        problems = Problems()
        check, need = problems.check, problems.need
        check(positive, "optim.epochs", self.epochs)
        check(positive, "optim.lr", self.lr)
        need(0 <= self.momentum < 1, f"optim.momentum: must be in [0, 1); got {self.momentum!r}")
        check(positive, "optim.weight_decay", self.weight_decay, allow_zero=True)
        check(one_of, "optim.schedule", self.schedule, SCHEDULES)
        check(positive, "optim.warmup_epochs", self.warmup_epochs, allow_zero=True)
        need(self.warmup_epochs < self.epochs,
             f"optim.warmup_epochs ({self.warmup_epochs}) must be < optim.epochs ({self.epochs})")
        need(sorted(self.milestones) == list(self.milestones) and all(m > 0 for m in self.milestones),
             f"optim.milestones: must be increasing positive epochs; got {self.milestones!r}")
        need(self.schedule != "step" or bool(self.milestones),
             "optim.milestones: the step schedule needs milestones, e.g. [160, 180]")
        need(self.schedule != "step" or not self.milestones or self.milestones[-1] < self.epochs,
             f"optim.milestones: {self.milestones} reaches past optim.epochs ({self.epochs}); milestones must be "
             "< epochs")
        need(0 < self.gamma <= 1, f"optim.gamma: must be in (0, 1]; got {self.gamma!r}")
        need(not (self.nesterov and self.momentum == 0), "optim.nesterov: Nesterov momentum needs optim.momentum > 0")
        problems.raise_if_any()


def build_optimizer(optim: OptimConfig, parameters):
    """torch.optim.SGD with the section's lr, momentum, weight decay (every parameter) and Nesterov flag."""
    import torch

    return torch.optim.SGD(parameters, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay,
                           nesterov=optim.nesterov)


class EpochLR:
    """The per-epoch learning rate of docs/design.md §2 (the BCL reference's adjust_learning_rate):
    epoch e < warmup: lr·(e+1)/warmup; then cos: lr·½(1 + cos(π(e − warmup + 1)/(epochs − warmup + 1)));
    step: lr·gamma^(number of milestones ≤ e)."""

    def __init__(self, optim_cfg: OptimConfig):
        self.cfg = optim_cfg
        self.last_epoch = -1

    def lr_at(self, epoch: int) -> float:
        c = self.cfg
        if epoch < c.warmup_epochs:
            return c.lr * (epoch + 1) / c.warmup_epochs
        if c.schedule == "cos":
            return c.lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - c.warmup_epochs + 1) /
                                                (c.epochs - c.warmup_epochs + 1)))
        return c.lr * c.gamma ** sum(1 for m in c.milestones if epoch >= m)

    def apply(self, optimizer, epoch: int) -> float:
        lr = self.lr_at(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        self.last_epoch = epoch
        return lr

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch, "base_lr": self.cfg.lr, "schedule": self.cfg.schedule}

    def load_state_dict(self, state: dict) -> None:
        self.last_epoch = int(state["last_epoch"])
