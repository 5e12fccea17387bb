"""Stop requests: SIGINT (Ctrl-C) and SIGTERM are honoured in every phase of a run, within seconds.

A :class:`StopFlag` is installed from the first line of a command to its last, and knows the
phase the run is in:

* **training steps** (``stepwise``): the first SIGINT/SIGTERM only sets :attr:`StopFlag.requested`;
  the trainer finishes the step in flight (or the checkpoint being written), saves the position
  and exits with ``TrainingInterrupted``. A second SIGINT aborts at once;
* **every other phase** (setup, evaluation, the final report): there is nothing to finish, so
  the signal raises :class:`PhaseInterrupt` where the process is, naming the phase and the state
  it leaves (the checkpoint to continue from). It derives from KeyboardInterrupt, so no
  ``except Exception`` on the way can swallow it.

Either way the exit code is 130 (SIGINT) or 143 (SIGTERM), files already saved are complete
(every write is temp file + rename) and ``--resume auto`` continues.

Tests stop a run at a chosen point with :func:`pause_point` (``FASTLT_TEST_PAUSE=<point>``): the
process writes its pid to ``FASTLT_TEST_PAUSE_FILE`` and waits there until a signal arrives, so
a test signals a known phase without racing it. Unset, it costs one dictionary lookup.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

__all__ = ["PhaseInterrupt", "SecondInterrupt", "StopFlag", "pause_point"]


class SecondInterrupt(KeyboardInterrupt):
    """A second Ctrl-C after a stop request: abort now instead of saving (tells the CLI which Ctrl-C it was)."""


class PhaseInterrupt(KeyboardInterrupt):
    """SIGINT/SIGTERM outside the training steps; the message names the phase and what to do next."""

    def __init__(self, message: str, signal_name: str):
        super().__init__(message)
        self.signal_name = signal_name

    def __str__(self) -> str:
        return str(self.args[0])


class StopFlag:
    """Context manager that turns SIGINT/SIGTERM into a stop request (see the module docstring)."""

    def __init__(self, phase: str = "training", after: str = "files already written are complete", *,
                 stepwise: bool = True):
        self.requested = False
        self.signal_name = ""
        self.stepwise = stepwise
        self.phase, self.after = phase, after
        self._previous = {}
        self._pid = os.getpid()

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:
            # A forked data-loader worker inherits this handler. A terminal's Ctrl-C reaches the
            # whole process group, and the deepspeed launcher terminates process trees: workers
            # ignore both and keep serving until the main process has saved and shuts them down.
            return
        name = signal.Signals(signum).name
        if not self.stepwise:
            self.requested, self.signal_name = True, name
            raise PhaseInterrupt(f"stopped by {name} during {self.phase}; {self.after}", name)
        if self.requested and signum == signal.SIGINT:
            raise SecondInterrupt
        self.requested = True
        self.signal_name = name
        print(f"\nfastlt: {self.signal_name} received: stopping after the current step and saving a checkpoint "
              "(press Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def during(self, phase: str, after: str, *, stepwise: bool = False):
        """Inside the block a signal stops the run as ``phase`` allows; ``after`` tells the user
        what state it leaves. Restores the enclosing phase on exit."""
        saved = self.phase, self.after, self.stepwise
        self.phase, self.after, self.stepwise = phase, after, stepwise
        try:
            yield self
        finally:
            self.phase, self.after, self.stepwise = saved

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
        self._previous = {}
        return False


def pause_point(name: str, flag: StopFlag | None) -> None:
    """Tests only: with ``FASTLT_TEST_PAUSE=name``, announce the pause in ``FASTLT_TEST_PAUSE_FILE``
    and wait until a signal stops the run (see the module docstring)."""
    if os.environ.get("FASTLT_TEST_PAUSE") != name:
        return
    print(f"fastlt-test: paused at {name}", flush=True)  # for tests that read the child's stdout
    marker = os.environ.get("FASTLT_TEST_PAUSE_FILE")
    if marker:
        tmp = Path(f"{marker}.tmp")
        tmp.write_text(str(os.getpid()))
        os.replace(tmp, marker)
    while flag is None or not flag.requested:  # outside the steps the signal handler raises out of here
        time.sleep(0.01)
