"""Probe 18: a leftover ``.fastlt.lock`` that is not this folder's own regular file (a symlink
to another run's ``best.pt``, a FIFO) is refused with one OutputError; the lock never writes
through a link (before: the target was truncated to the holder line; a FIFO gave EINVAL)."""
import os

import pytest

from fastlt.errors import OutputError
from fastlt.training.runlock import RunLock


def test_lock_file_symlink_is_refused_and_target_untouched(tmp_path):
    other = tmp_path / "B"
    other.mkdir()
    best = other / "best.pt"
    best.write_bytes(b"weights of a finished run")
    run = tmp_path / "R"
    run.mkdir()
    (run / ".fastlt.lock").symlink_to(best)
    with pytest.raises(OutputError, match="symbolic link"):
        RunLock(run, "fastlt train").acquire()
    assert best.read_bytes() == b"weights of a finished run"
    assert (run / ".fastlt.lock").is_symlink()


def test_dangling_lock_symlink_is_refused(tmp_path):
    run = tmp_path / "R"
    run.mkdir()
    (run / ".fastlt.lock").symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputError, match="symbolic link"):
        RunLock(run, "fastlt train").acquire()
    assert not (tmp_path / "nowhere").exists()


def test_lock_file_fifo_is_refused(tmp_path):
    run = tmp_path / "R"
    run.mkdir()
    os.mkfifo(run / ".fastlt.lock")
    with pytest.raises(OutputError, match="not a regular file"):
        RunLock(run, "fastlt train").acquire()


def test_leftover_regular_lock_file_is_taken_over(tmp_path):
    run = tmp_path / "R"
    run.mkdir()
    (run / ".fastlt.lock").write_text("host x, pid 1, started long ago (fastlt train)\n")
    lock = RunLock(run, "fastlt train").acquire()
    try:
        assert lock.held
    finally:
        lock.release()


def test_eval_refuses_to_write_its_report_into_another_runs_directory(tmp_path, capsys):
    """Found by the reliability probe: `fastlt eval --checkpoint runs/A --report-dir runs/B` replaced
    finished run B's per_class.csv and plots with A's evaluation, without B's lock."""
    from fastlt.commands import _run_dir_lock
    from fastlt.errors import OutputError

    a, b = tmp_path / "A", tmp_path / "B"
    for run in (a, b):
        (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(OutputError, match=r"lies inside the run directory .*B, which is not the checkpoint's run"):
        _run_dir_lock(a, [b / "report"], "fastlt eval")
    with pytest.raises(OutputError, match="lies inside the run directory"):
        _run_dir_lock(a, [b / "metrics.json"], "fastlt eval")
    with _run_dir_lock(a, [tmp_path / "elsewhere"], "fastlt eval"):  # outside every run: no lock needed
        pass
    with _run_dir_lock(a, [a / "eval_val"], "fastlt eval"):  # its own run: under that run's lock
        assert (a / ".fastlt.lock").exists()
