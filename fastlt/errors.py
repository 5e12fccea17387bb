"""The errors fastlt raises for expected failures, in one place.

Each is a failure a user can act on; its message names what was wrong (the config key, the
file, the checkpoint), the value received and how to fix it. ``fastlt.cli`` turns them into
one ``fastlt: error: ...`` line and an exit code instead of a traceback:

=====================  =========================================================  ====
error                  raised when                                                exit
=====================  =========================================================  ====
ConfigError            a config key or value is wrong, or two keys disagree       2
DataError              the data the config points at is missing or does not fit   2
BadImageError          an image cannot be read or decoded (``on_error: raise``)   2
CheckpointError        a checkpoint is missing, damaged or from another run       2
OutputError            the run directory or an output file cannot be written      2
PipelineError          a data-pipeline worker process died (e.g. killed for OOM)  2
LaunchError            the launcher/SLURM environment gives no consistent world   2
RankLostError          another rank of the job died or stopped with an error      4
NonFiniteLossError     the loss (or the weights) became nan/inf                   3
TrainingInterrupted    Ctrl-C / SIGTERM: a checkpoint was written, then a stop    130/143
=====================  =========================================================  ====
"""
from __future__ import annotations

import errno

__all__ = ["BadImageError", "CheckpointError", "ConfigError", "DataError", "FastltError", "NonFiniteLossError",
           "LaunchError", "OutputError", "PipelineError", "REASONS", "RankLostError", "TrainingInterrupted",
           "exit_code"]


class FastltError(Exception):
    """Base of the expected failures (see the module docstring)."""


class ConfigError(FastltError, ValueError):
    """A configuration problem; the message names the key, the value and how to fix it."""


class DataError(FastltError, ValueError):
    """The data the config points at is missing or does not fit the config."""


class BadImageError(FastltError, RuntimeError):
    """An image that cannot be read or decoded; the message names the file (and its list line)."""

    @classmethod
    def in_training(cls, err: "BadImageError", epoch: int, step: int, steps: int, *, saved=None, rank: int = 0,
                    world_size: int = 1, last_checkpoint=None) -> "BadImageError":
        """``err`` met at ``step`` of ``epoch`` (of ``steps``), with what became of the training so
        far: the checkpoint ``saved`` of the steps before it (one process), or else the last one."""
        text = str(err).rstrip(". ")
        where = f"Training stopped in epoch {epoch} after {step} of its {steps} steps"
        if saved is not None:
            return cls(f"{text}. {where}; everything trained so far is in checkpoint {saved}, and --resume auto "
                       "continues from this batch")
        if world_size == 1:
            return cls(f"{text}. Training stopped at its first batch, before anything was trained")
        kept = (f"the last checkpoint is {last_checkpoint} (--resume auto continues from it)"
                if last_checkpoint is not None else "no checkpoint had been written yet")
        return cls(f"{text}. {where} on rank {rank} of {world_size}; {kept}")


class CheckpointError(FastltError, RuntimeError):
    """A checkpoint that cannot be used (missing, incomplete, damaged, or from another model or setup)."""


class OutputError(FastltError, RuntimeError):
    """A file of the run cannot be written (read-only folder, a file in the way, a full disk); the
    message names the path and the cause. What was already saved is untouched."""


class PipelineError(FastltError, RuntimeError):
    """A worker process of the data pipeline died (killed by a signal, e.g. by the out-of-memory killer)."""


class NonFiniteLossError(FastltError, RuntimeError):
    """The loss or the weights became nan/inf; training stopped before anything was saved from that state."""

    @classmethod
    def at(cls, epoch: int, step: int, steps: int, *, losses=None, tensors: int = 0, last_checkpoint=None,
           lr: float | None = None) -> "NonFiniteLossError":
        """The error for a non-finite loss (``losses`` = its (loss, ce, scl), None if another rank
        saw it) or, with ``tensors`` > 0, for that many non-finite weight / optimizer tensors after
        a step whose loss was still finite; names the last good checkpoint and the usual causes."""
        if tensors:
            event = (f"the weights or optimizer state became non-finite in epoch {epoch} ({tensors} tensor(s) hold "
                     f"nan/inf after step {step + 1}/{steps}, whose loss was still finite)")
        else:
            what = (f"loss {losses[0]}, ce {losses[1]}, scl {losses[2]}" if losses is not None
                    else "reported by another rank, at or before this step")
            event = f"the loss became non-finite at epoch {epoch}, step {step + 1}/{steps} ({what})"
        where = (f"The last good checkpoint is {last_checkpoint}; it is untouched (resume with --resume auto)."
                 if last_checkpoint is not None else "No checkpoint had been written yet.")
        return cls(f"{event}; training stopped and nothing was saved from this state. {where} Common causes: a "
                   f"learning rate too high for the batch size (optim.lr={lr}), or fp16 overflow (try "
                   "deepspeed.precision=bf16).")


class TrainingInterrupted(FastltError, RuntimeError):
    """Ctrl-C / SIGTERM: a checkpoint of the current position was written and training stopped."""

    def __init__(self, message: str, signal_name: str = ""):
        super().__init__(message)
        self.signal_name = signal_name


class LaunchError(FastltError, RuntimeError):
    """The launcher's or the scheduler's environment does not give this process one consistent
    place in a job (``fastlt.training.cluster``); the message names the variables."""


class RankLostError(FastltError, RuntimeError):
    """Another rank of the job died (killed, its node lost) or stopped with an error, so this one
    cannot go on (``fastlt.training.watchdog``). ``report`` is True on the one surviving rank that
    prints the line (the lowest), so a job of many ranks says it once."""

    def __init__(self, message: str, report: bool = True):
        super().__init__(message)
        self.report = report


def exit_code(err: FastltError) -> int:
    """The exit code of an expected failure (the table in the module docstring)."""
    if isinstance(err, RankLostError):
        return 4
    if isinstance(err, NonFiniteLossError):
        return 3
    if isinstance(err, TrainingInterrupted):
        return 143 if err.signal_name == "SIGTERM" else 130
    return 2


#: What an errno means for a file fastlt reads or writes, in the words its messages use.
REASONS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
            errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
            errno.EPERM: "operation not permitted (read-only or immutable folder)",
            errno.EFBIG: "the file is larger than this process may write (ulimit -f)",
            errno.EISDIR: "it is a directory", errno.ENOTDIR: "a part of the path is a file, not a folder",
            errno.ENOENT: "its folder does not exist"}
