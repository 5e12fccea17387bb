"""The demo recipe (``configs/demo.yaml``, ``fastlt demo``): two runs on one machine give the same
numbers and the same weights, and the closing banner names what was trained — ConCutMix, or
CutMix only for the baseline arm whose ``method.l_d_warm`` keeps the area label to the end."""
from __future__ import annotations

import json

import torch

from conftest import REPO, run_fastlt
from fastlt.config.loader import load_config
from fastlt.demo import demo_method, demo_summary
from fastlt.training.checkpoint import load_weights

DEMO = REPO / "configs" / "demo.yaml"
# Two epochs of two steps (area labels in epoch 0, ConCutMix labels in epoch 1), evaluated after
# each: every part of the demo's run, at a few CPU seconds.
SHORT = ["optim.epochs=2", "optim.warmup_epochs=0", "method.l_d_warm=0", "run.max_steps_per_epoch=2",
         "run.eval_every=1"]


def _summary(method: str) -> str:
    result = {"overall": 50.0, "many": 60.0, "medium": 50.0, "few": 40.0, "train_time_s": 1.0, "run_dir": "runs/x"}
    return demo_summary(result, {"train_class_counts": [250, 50, 5]}, 2.0, method)


def test_the_banner_says_concutmix_only_when_an_epoch_trains_on_rectified_labels():
    cfg = load_config(DEMO)
    assert demo_method(cfg) == "ConCutMix"
    assert "fastlt demo: ConCutMix on the synthetic long-tailed set (3 classes" in _summary(demo_method(cfg))
    for warm in (cfg.optim.epochs - 1, cfg.optim.epochs):  # no epoch is > l_d_warm: area labels throughout
        baseline = demo_method(load_config(DEMO, [f"method.l_d_warm={warm}"]))
        assert baseline.startswith("CutMix only (area labels throughout") and f"l_d_warm={warm}" in baseline
        assert "ConCutMix" not in _summary(baseline)


def _short_demo(tmp_path, name: str) -> tuple[dict, list, dict]:
    run_fastlt("demo", "--config", DEMO, "--set", *SHORT, f"data.root={tmp_path / 'data'}",
               f"run.output_dir={tmp_path}", f"run.name={name}", module="fastlt.cli",
               timeout=900)  # ~15 CPU-seconds; the margin is for a machine shared by many
    run = tmp_path / name
    metrics = json.loads((run / "metrics.json").read_text())
    losses = [(r["epoch"], r["step"], r["loss"], r["ce"], r["scl"])
              for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["event"] == "train"]
    weights, _ = load_weights(run / "last.pt")
    return metrics, losses, weights


def test_two_short_demo_runs_are_identical(tmp_path):
    metrics_a, losses_a, weights_a = _short_demo(tmp_path, "a")
    metrics_b, losses_b, weights_b = _short_demo(tmp_path, "b")
    assert losses_a and losses_a == losses_b  # exact: same seed, same machine, same arithmetic
    assert metrics_a["final"]["overall"] is not None and len(metrics_a["history"]) == 2
    assert (metrics_a["final"], metrics_a["history"]) == (metrics_b["final"], metrics_b["history"])
    assert weights_a.keys() == weights_b.keys()
    different = [k for k in weights_a if not torch.equal(weights_a[k], weights_b[k])]
    assert not different, f"{len(different)} of {len(weights_a)} tensors of last.pt differ, e.g. {different[:3]}"
