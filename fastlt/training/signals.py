"""Stop requests: Ctrl-C and SIGTERM end a training run at a step boundary, after a checkpoint.

The first SIGINT/SIGTERM only sets :attr:`StopFlag.requested`; the trainer finishes the step
in flight (or the checkpoint being written), saves the position and exits. A second SIGINT
aborts at once; files already saved are complete either way.

Test-only: ``FASTLT_TEST_PAUSE_AT=<epoch>:<step>`` makes the trainer stop after that step of
that epoch (0-based) has trained, print ``fastlt-test: paused at epoch E step S`` to stdout and
wait for a SIGINT/SIGTERM before going on, so that a test's signal lands at a known step
instead of racing the training loop. Not for users: a run with it set waits for a signal.
"""
from __future__ import annotations

import os
import signal
import sys
import time

__all__ = ["SecondInterrupt", "StopFlag", "pause_for_test"]

PAUSE_ENV = "FASTLT_TEST_PAUSE_AT"
PAUSE_LIMIT_S = 600.0  # a test that never signals fails instead of hanging


class SecondInterrupt(KeyboardInterrupt):
    """A second Ctrl-C after a stop request: abort now instead of saving (tells the CLI which Ctrl-C it was)."""


class StopFlag:
    """Context manager that turns SIGINT/SIGTERM into a stop request (see the module docstring)."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._previous = {}
        self._pid = os.getpid()

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:
            # A forked data-loader worker inherits this handler. A terminal's Ctrl-C reaches the
            # whole process group, and the deepspeed launcher terminates process trees: workers
            # ignore both and keep serving until the main process has saved and shuts them down.
            return
        if self.requested and signum == signal.SIGINT:
            raise SecondInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        print(f"\nfastlt: {self.signal_name} received: stopping after the current step and saving a checkpoint "
              "(press Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def __enter__(self):
        self._pid = os.getpid()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test helper thread)
                pass
        return self

    def __exit__(self, *exc):
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        return False


def pause_for_test(stop: StopFlag, epoch: int, step: int) -> None:
    """The test-only pause of the module docstring: a no-op unless ``FASTLT_TEST_PAUSE_AT`` names
    this (epoch, step); then wait until ``stop`` is requested by a signal."""
    at = os.environ.get(PAUSE_ENV)
    if not at or at != f"{epoch}:{step}":
        return
    print(f"fastlt-test: paused at epoch {epoch} step {step}", flush=True)
    deadline = time.monotonic() + PAUSE_LIMIT_S
    while not stop.requested:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{PAUSE_ENV}={at}: no SIGINT/SIGTERM within {PAUSE_LIMIT_S:.0f} s")
        time.sleep(0.02)  # the signal handler runs between these sleeps
