"""An audit trail of which samples each trained step used (``run.sample_log: true``).

Every rank appends one JSON line per trained step to ``samples.rank<R>.jsonl`` in the run
directory: the epoch, the step, the world size, the launch (``attempt``: torchrun's restart
count, 0 without torchrun), and the dataset indices of this rank's share of the step — its
background and foreground images, with their positions in the epoch's global sequence. The
indices are those of the pipeline's plan (``pipeline.indices(epoch)``), which both training
pipelines deliver batch for batch.

This is how a resume or an elastic restart at another world size is checked: the steps of the
epoch, put together from the launches that trained them, must hold every sample of the epoch's
sequence once (``tests/test_cluster.py``). Off by default; a line costs a few hundred bytes per
rank and step.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["SampleLog"]


class SampleLog:
    """Appends this rank's step indices to ``run_dir/samples.rank<R>.jsonl`` (see the module docstring)."""

    def __init__(self, run_dir: Path, pipeline, *, rank: int, world_size: int, batch_size: int):
        self.path = Path(run_dir) / f"samples.rank{rank:05d}.jsonl"
        self.pipeline, self.rank, self.world, self.batch = pipeline, rank, world_size, batch_size
        self.attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        self._epoch, self._indices = None, None
        self._file = self.path.open("a", encoding="utf-8")

    def step(self, epoch: int, step: int) -> None:
        """Record step ``step`` of ``epoch`` (after it was trained)."""
        from fastlt.method.sampling import global_position

        if epoch != self._epoch:
            self._epoch, self._indices = epoch, self.pipeline.indices(epoch)
        bg, fg = self._indices
        rows = slice(step * self.batch, (step + 1) * self.batch)
        self._file.write(json.dumps({
            "epoch": epoch, "step": step, "rank": self.rank, "world_size": self.world, "attempt": self.attempt,
            "positions": [global_position(step, i, self.batch, self.rank, self.world) for i in range(self.batch)],
            "background": [int(v) for v in bg[rows]], "foreground": [int(v) for v in fg[rows]]}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
