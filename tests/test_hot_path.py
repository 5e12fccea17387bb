"""The training step never waits and never copies the images again (CPU-checkable halves of the
GPU hot path):

* the host synchronises with the device at most once per log interval, epoch end, evaluation
  and checkpoint — counted by wrapping DeepSpeed's accelerator ``synchronize`` and
  ``torch.cuda.synchronize`` over a multi-epoch run (DeepSpeed's own throughput timer, which
  synchronises every step unless switched off, is the control);
* the host reads no tensor value inside a training step (``.item()``, ``.cpu()``,
  ``.tolist()``, ``bool()``, ...: each a wait for the device on a GPU) except the CPU-only
  input checks, and reads them only at the end of a log interval — counted by wrapping those
  ``torch.Tensor`` methods for the step's duration; a planted ``.item()`` is caught;
* the pipelines deliver one (3B, 3, H, W) tensor in the model's memory format and dtype, and
  the model's forward receives exactly that storage (pointer, strides, dtype), on both backends.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, child_env, tiny_config, write_config
from fastlt.pipelines import dali_available

PROBE = Path(__file__).parent / "probes" / "step_probe.py"
EPOCHS, STEPS, LOG_EVERY = 3, 6, 2


# Reads a step may make on CPU only: the label range checks that run on CPU tensors only
# (guarded by ``device.type == "cpu"``; on CUDA they are skipped, as their comments say).
CPU_ONLY_CHECKS = {"fastlt/method/parts.py:resolve_supcon_args", "kernels/compact.py:_validate_compact",
                   "kernels/rectify.py:_prepare"}


def _probe(cfg_path: Path, *overrides: str, plant: bool = False) -> dict:
    proc = subprocess.run([sys.executable, str(PROBE), "--config", str(cfg_path), *(("--set", *overrides) if overrides
                                                                                   else ()),
                           *(("--plant-item",) if plant else ())],
                          capture_output=True, text=True, timeout=600, cwd=REPO, env=child_env())
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("PROBE "):])


@pytest.fixture(scope="module")
def data_root(tiny_data_root) -> Path:
    return tiny_data_root


def test_host_syncs_at_most_once_per_interval_epoch_eval_and_checkpoint(tmp_path, data_root):
    cfg = tiny_config(data_root, tmp_path, optim={"epochs": EPOCHS},
                      run={"name": "syncs", "log_every": LOG_EVERY, "eval_every": 1, "checkpoint_every": 1})
    path = write_config(tmp_path / "syncs.yaml", cfg)
    got = _probe(path)
    assert len(got["steps"]) == EPOCHS * STEPS
    intervals = EPOCHS * -(-STEPS // LOG_EVERY)
    budget = intervals + EPOCHS + EPOCHS + EPOCHS  # intervals, epoch ends, evaluations, checkpoints
    total = got["syncs"]["accelerator"] + got["syncs"]["torch.cuda"]
    assert total <= budget, got["syncs"]
    # fp32, default layout: the model gets the pipeline's contiguous NCHW tensor itself.
    for step, fwd in zip(got["steps"], got["forwards"]):
        assert fwd["ptr"] == step["ptr"] and step["stride"] == [3 * 16 * 16, 16 * 16, 16, 1]
        assert step["dtype"] == fwd["dtype"] == str(torch.float32) and step["views_share_storage"]
    # Control: DeepSpeed's throughput timer on (its default) synchronises in every step.
    cfg["run"].update(name="timers", max_steps_per_epoch=4)
    cfg["optim"]["epochs"] = 1
    control = _probe(write_config(tmp_path / "timers.yaml", cfg),
                     "deepspeed.extra={timers: {throughput: {enabled: true}}}")
    assert control["syncs"]["accelerator"] >= 4, control["syncs"]


def _reads(got: dict, where: str) -> dict[int, list]:
    out: dict[int, list] = {}
    for r in got["host_reads"]:
        if r["in"] == where:
            out.setdefault(r["step"], []).append(r)
    return out


def test_host_reads_values_only_at_log_interval_ends(tmp_path, data_root):
    """One epoch of 6 steps, log_every 4: interval ends after steps 3 and 5 (the epoch's last)."""
    cfg = tiny_config(data_root, tmp_path, optim={"epochs": 1}, run={"name": "reads", "log_every": 4})
    got = _probe(write_config(tmp_path / "reads.yaml", cfg))
    assert len(got["steps"]) == STEPS
    in_step = [r for r in got["host_reads"] if r["in"] == "step"]
    assert {r["site"] for r in in_step} <= CPU_ONLY_CHECKS, in_step
    ends = _reads(got, "interval_end")
    assert sorted(ends) == [3, 5], ends
    # The interval's one copy of its per-step values to the host is among the reads there.
    assert all(any(r["method"] == "cpu" and r["site"] == "fastlt/training/trainer.py:_end_interval" for r in rs)
               for rs in ends.values()), ends


def test_host_read_counter_catches_an_item_planted_in_the_step(tmp_path, data_root):
    cfg = tiny_config(data_root, tmp_path, optim={"epochs": 1}, run={"name": "planted", "max_steps_per_epoch": 2})
    got = _probe(write_config(tmp_path / "planted.yaml", cfg), plant=True)
    planted = [r for r in got["host_reads"] if r["in"] == "step" and r["site"] not in CPU_ONLY_CHECKS]
    assert [(r["step"], r["method"], r["site"]) for r in planted] == [
        (0, "item", "tests/probes/step_probe.py:planted"), (1, "item", "tests/probes/step_probe.py:planted")]


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=pytest.mark.skipif(
    not dali_available()[0], reason="nvidia.dali does not import"))])
def test_the_model_receives_the_pipeline_s_one_image_tensor(tmp_path, data_root, backend):
    """DeepSpeed's bf16 mode (bf16 weights) with channels-last: the pipeline writes bf16 NHWC."""
    sections = dict(optim={"epochs": 1}, pipeline={"backend": backend, "num_workers": 1},
                    model={"channels_last": True}, deepspeed={"precision": "bf16", "autocast": False},
                    run={"name": backend, "max_steps_per_epoch": 3, "eval_every": 1})
    got = _probe(write_config(tmp_path / "c.yaml", tiny_config(data_root, tmp_path, **sections)))
    b, size = 8, 16
    assert len(got["steps"]) == len(got["forwards"]) == 3
    for step, fwd in zip(got["steps"], got["forwards"]):
        assert step["shape"] == [3 * b, 3, size, size] and step["views_share_storage"]
        assert fwd["ptr"] == step["ptr"] and fwd["stride"] == step["stride"] and fwd["dtype"] == step["dtype"]
        assert step["dtype"] == str(torch.bfloat16) and fwd["channels_last"]
        assert step["stride"] == [3 * size * size, 1, 3 * size, 3]
