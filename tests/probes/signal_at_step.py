"""Run ``python -m fastlt.train`` arguments in this process and signal the run from inside
training step STEP (1-based, counted over the run), before that step computes anything:

* ``SIGTERM`` goes to this process (a scheduler stopping the job);
* ``SIGINT`` goes to the whole process group (a terminal's Ctrl-C, which reaches the
  data-loader workers too; start this script in its own session).

A test that waited for a log line and then signalled from outside raced the run: on a busy
machine the tiny run could finish its epoch (or the whole run) first. Here the signal always
arrives during step STEP, so the stop lands at that step's boundary whatever the load; the
handling of the signal (the handler, the stop at the boundary, the checkpoint, the exit code
and message) is the trainer's own.

usage: python signal_at_step.py SIGINT|SIGTERM STEP [fastlt.train arguments...]
"""
import os
import signal
import sys


def main(argv):
    name, at, args = argv[0], int(argv[1]), argv[2:]
    from fastlt.cli import train_main  # first: it sets the OpenMP wait policy before torch loads

    import fastlt.method.objective as objective

    calls = 0
    train_step = objective.train_step

    def signalling_step(*a, **k):
        nonlocal calls
        calls += 1
        if calls == at:
            if name == "SIGINT":
                os.killpg(os.getpgrp(), signal.SIGINT)
            else:
                os.kill(os.getpid(), getattr(signal, name))
        return train_step(*a, **k)

    objective.train_step = signalling_step
    return train_main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
