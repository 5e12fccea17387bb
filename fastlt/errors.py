"""The errors fastlt raises for expected failures, in one place.

Each is a failure a user can act on; its message names what was wrong (the config key, the
file, the checkpoint), the value received and how to fix it. ``fastlt.cli`` turns them into
one ``fastlt: error: ...`` line and an exit code instead of a traceback:

=====================  =========================================================  ====
error                  raised when                                                exit
=====================  =========================================================  ====
ConfigError            a config key or value is wrong, or two keys disagree       2
DataError              the data the config points at is missing or does not fit   2
CheckpointError        a checkpoint is missing, damaged or from another run       2
NonFiniteLossError     the loss (or the weights) became nan/inf                   3
TrainingInterrupted    Ctrl-C / SIGTERM: a checkpoint was written, then a stop    130/143
=====================  =========================================================  ====
"""
from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "DataError", "FastltError", "NonFiniteLossError",
           "TrainingInterrupted"]


class FastltError(Exception):
    """Base of the expected failures (see the module docstring)."""


class ConfigError(FastltError, ValueError):
    """A configuration problem; the message names the key, the value and how to fix it."""


class DataError(FastltError, ValueError):
    """The data the config points at is missing or does not fit the config."""


class CheckpointError(FastltError, RuntimeError):
    """A checkpoint that cannot be used (missing, incomplete, damaged, or from another model or setup)."""


class NonFiniteLossError(FastltError, RuntimeError):
    """The loss became nan/inf; training stopped before anything was saved from that state."""


class TrainingInterrupted(FastltError, RuntimeError):
    """Ctrl-C / SIGTERM: a checkpoint of the current position was written and training stopped."""

    def __init__(self, message: str, signal_name: str = ""):
        super().__init__(message)
        self.signal_name = signal_name
