"""The record of a finished evaluation (``fastlt.training.eval_record``): a resume takes it only
for the very checkpoint it completes and only when it holds what an evaluation gives; anything
else (another timeline's checkpoint of the same name, an epoch that saved no checkpoint, a
record damaged or edited by hand) makes the evaluation run again. The runs themselves:
tests/test_faults.py::test_14_resuming_a_finished_run... and the signal tests."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from fastlt.training.eval_record import record_evaluation, recorded_evaluation

CLASSES = 3


class _Log:
    def __init__(self):
        self.events = []

    def event(self, kind, message, **fields):
        self.events.append((kind, message))


def _checkpoint(root: Path, tag: str, time: float) -> Path:
    path = root / "checkpoints" / tag
    path.mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps({"tag": tag, "epoch": 1, "step": 0, "time": time}))
    return path


def _trainer(run_dir: Path) -> SimpleNamespace:
    summary = {"epoch": 0, "overall": 50.0, "many": 60.0, "medium": None, "few": 40.0}
    return SimpleNamespace(rank=0, run_dir=run_dir, history=[summary], best=summary, log=_Log())


METRICS = {"overall": 50.0, "many": 60.0, "medium": math.nan, "few": 40.0, "per_class": [60.0, 50.0, 40.0],
           "n": 30, "per_class_n": [10, 10, 10], "shot_thresholds": {"many": 100, "few": 20}}


def test_the_record_is_taken_for_its_checkpoint_only(tmp_path):
    ckpt = _checkpoint(tmp_path, "epoch0001_step000000", 100.0)
    record_evaluation(_trainer(tmp_path), 0, METRICS, ckpt)
    rec = recorded_evaluation(tmp_path, 0, ckpt, CLASSES)
    assert rec is not None and rec["history"][0]["overall"] == 50.0 and math.isnan(rec["metrics"]["medium"])
    assert rec["metrics"]["per_class"] == [60.0, 50.0, 40.0] and math.isnan(rec["best"]["medium"])
    # The same tag saved again (another timeline): its save time differs, the record is not taken.
    (ckpt / "meta.json").write_text(json.dumps({"tag": ckpt.name, "time": 101.0}))
    assert recorded_evaluation(tmp_path, 0, ckpt, CLASSES) is None
    assert recorded_evaluation(tmp_path, 1, ckpt, CLASSES) is None  # another epoch's


def test_an_epoch_that_saved_no_checkpoint_matches_none(tmp_path):
    """The probe's case: with run.checkpoint_every changed on a resume, an epoch that saved no
    checkpoint once tied its record to an older timeline's folder of the next tag."""
    old = _checkpoint(tmp_path, "epoch0003_step000000", 100.0)  # left by an earlier timeline
    record_evaluation(_trainer(tmp_path), 2, METRICS, None)
    assert json.loads((tmp_path / "evaluations" / "epoch0002.json").read_text())["checkpoint"] is None
    assert recorded_evaluation(tmp_path, 2, old, CLASSES) is None


@pytest.mark.parametrize("damage", [
    lambda r: r["history"][0].update(overall="abc"),
    lambda r: r["best"].update(overall="abc"),
    lambda r: r["metrics"].update(per_class=[1.0]),
    lambda r: r["metrics"].update(overall="abc"),
    lambda r: r["metrics"].update(per_class="abc"),
    lambda r: r.update(history="abc"),
    lambda r: r.update(history=[]),
    lambda r: r["history"][0].update(epoch=True),
    lambda r: r.pop("best"),
], ids=["history-str", "best-str", "per-class-length", "overall-str", "per-class-str", "history-str-list",
        "history-without-epoch", "epoch-bool", "no-best"])
def test_a_record_with_wrong_values_is_not_trusted(tmp_path, damage):
    ckpt = _checkpoint(tmp_path, "epoch0001_step000000", 100.0)
    path = record_evaluation(_trainer(tmp_path), 0, METRICS, ckpt)
    rec = json.loads(path.read_text())
    damage(rec)
    path.write_text(json.dumps(rec))
    assert recorded_evaluation(tmp_path, 0, ckpt, CLASSES) is None


def test_a_record_that_cannot_be_written_is_reported_and_the_run_goes_on(tmp_path):
    ckpt = _checkpoint(tmp_path, "epoch0001_step000000", 100.0)
    (tmp_path / "evaluations" / "epoch0000.json").mkdir(parents=True)  # a folder in its place
    trainer = _trainer(tmp_path)
    assert record_evaluation(trainer, 0, METRICS, ckpt) is None
    ((kind, message),) = trainer.log.events
    assert kind == "warning" and "the record of the evaluation of epoch 0 was not written" in message
    assert recorded_evaluation(tmp_path, 0, ckpt, CLASSES) is None
