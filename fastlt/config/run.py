"""The ``run`` section: where a run's outputs go, its logging, evaluation and checkpoint cadence,
and how it treats its run directory and the ranks of its job."""
from __future__ import annotations

import os
from dataclasses import dataclass

from fastlt.config.typed import check_path, one_of, positive
from fastlt.errors import ConfigError

__all__ = ["COMPILE_MODES", "DEVICES", "RunConfig"]

#: ``run.device``: auto (CUDA when available), cpu or cuda.
DEVICES = ("auto", "cpu", "cuda")
#: ``run.compile``: off, or a torch.compile mode ("reduce-overhead" = CUDA graphs).
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

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
    async_checkpoint: bool = False
    """Write each resumable checkpoint in a background thread: training waits only while the state
    is copied to host memory (one extra copy of what the rank writes, while the write runs). The
    checkpoint counts only once every rank has written all of it (``latest`` moves then, as with
    a synchronous save: at the first log interval after the writes ended, or earlier when the run
    waits for it, before the next checkpoint, an evaluation, a stop's exit and the end). After a
    crash or a lost rank, a checkpoint still being written is not used (``latest`` stays at the
    previous complete one)."""
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
    many_shot: int = 100
    """Classes with more than many_shot training images are many-shot (the long-tail convention)."""
    few_shot: int = 20
    """Classes with fewer than few_shot training images are few-shot; the rest are medium-shot."""
    lock: bool = True
    """Hold an exclusive lock on the run directory while the run lives (``fastlt.training.runlock``);
    false only for file systems without file locks, where keeping a second process out is yours."""
    allow_data_change: bool = False
    """Resume at an epoch boundary although the training set differs from the one the checkpoint
    was trained on (image count, class counts or list); the change is logged. A mid-epoch resume
    on another training set is always refused."""

    def __post_init__(self):
        one_of("run.device", self.device, DEVICES)
        check_path("run.output_dir", self.output_dir)
        check_path("run.name", self.name)
        one_of("run.compile", self.compile, COMPILE_MODES)
        positive("run.seed", self.seed, allow_zero=True)
        positive("run.log_every", self.log_every)
        positive("run.eval_every", self.eval_every)
        positive("run.checkpoint_every", self.checkpoint_every)
        positive("run.keep_last", self.keep_last)
        positive("run.max_steps_per_epoch", self.max_steps_per_epoch, allow_zero=True)
        positive("run.many_shot", self.many_shot, allow_zero=True)
        positive("run.few_shot", self.few_shot, allow_zero=True)
        if self.few_shot > self.many_shot + 1:
            raise ConfigError(f"run.few_shot ({self.few_shot}) must not exceed run.many_shot + 1 "
                              f"({self.many_shot + 1}): a class cannot be both many-shot and few-shot")
        if not self.collective_timeout_s >= 1:
            raise ConfigError(f"run.collective_timeout_s: must be at least 1 (seconds); got {self.collective_timeout_s}")
        if self.name and (os.sep in self.name or self.name in (".", "..")):
            raise ConfigError(f"run.name: must be a plain folder name without '{os.sep}'; got {self.name!r}")
