"""A DALI reader process that dies (SIGKILL, the out-of-memory killer) never hangs the pipeline
or its shutdown: the next batch raises PipelineError naming the reader, and close() returns.

Before the change, the shutdown could wait forever: once one process of DALI's reader pool is
gone, DALI's pool terminates the others with SIGTERM and joins them without a timeout, and
fastlt's readers (forked from a trainer whose stop handler catches SIGTERM) outlive SIGTERM.
"""
from __future__ import annotations

import os
import signal
import threading

import pytest

pytest.importorskip("nvidia.dali", reason="DALI is not installed")

from fastlt.data import LongTailedList, make_synthetic_lt  # noqa: E402
from fastlt.errors import PipelineError  # noqa: E402
from fastlt.pipelines import TrainPipelineSpec, build_train_pipeline  # noqa: E402

BOUND_S = 120  # generous: the shutdown takes about a second; only a hang reaches this


def _readers(pipe) -> list:
    """The Python reader processes of the live DALI pipeline (DALI's worker pool)."""
    return list(pipe._pipe._py_pool.pool._processes)


@pytest.mark.parametrize("closing_first", [False, True], ids=["next-batch", "close"])
def test_a_killed_reader_raises_and_the_pipeline_still_closes(tmp_path, closing_first):
    made = make_synthetic_lt(tmp_path / "lt", num_classes=4, imb_factor=0.5, n_max=16, image_size=32, seed=3, n_val=2)
    spec = TrainPipelineSpec(dataset=LongTailedList(made.root, made.train_list), image_size=16, batch_size=4, seed=0,
                             augment=False, num_workers=1, extra={"py_num_workers": 2, "py_start_method": "fork"})
    # As in a training run: the stop handler catches SIGTERM, and the forked readers inherit it.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    pipe = build_train_pipeline(spec, "dali")
    outcome, readers = {}, []
    try:
        batches = pipe.epoch(0)
        next(batches)
        readers = _readers(pipe)
        assert len(readers) == 2
        os.kill(readers[0].pid, signal.SIGKILL)
        readers[0].join(30)

        def rest():
            if closing_first:  # the shutdown of a pool with a dead reader, as after a failed run()
                pipe.close()
                outcome["closed"] = True
                return
            try:
                for _ in batches:
                    pass
                outcome["error"] = None
            except PipelineError as e:
                outcome["error"] = str(e)
            pipe.close()
            outcome["closed"] = True

        worker = threading.Thread(target=rest, daemon=True)
        worker.start()
        worker.join(BOUND_S)
        assert not worker.is_alive(), f"the pipeline did not raise and close within {BOUND_S} s (a hang)"
        assert outcome.get("closed") is True
        if not closing_first:
            assert outcome["error"] and f"a DALI reader process (pid {readers[0].pid}) was killed by signal SIGKILL" \
                in outcome["error"], outcome
        assert all(p.exitcode is not None for p in readers)  # no reader left behind
    finally:
        signal.signal(signal.SIGTERM, previous)
        for p in readers:
            if p.exitcode is None:
                p.kill()
