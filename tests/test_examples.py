"""Every script in examples/ runs as a user runs it (``python examples/<name>.py``), a few steps
each, and prints what it says it prints."""
from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO, child_env

EXAMPLES = REPO / "examples"


def _run(script: str, *args: str, cwd) -> str:
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          cwd=cwd, env=child_env(), timeout=900)  # a few CPU-seconds; margin for a shared machine
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_every_example_has_a_test():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == ["custom_training_loop.py", "losses_in_your_model.py"]


def test_custom_training_loop_trains_both_label_phases_and_evaluates(tmp_path):
    out = _run("custom_training_loop.py", "--epochs", "2", "--steps", "2", "--data", str(tmp_path / "data"),
               cwd=tmp_path)
    assert "epoch 0 (area labels): 2 steps, last loss " in out
    assert "epoch 1 (rectified labels): 2 steps, last loss " in out
    m = re.search(r"validation accuracy \(%\): overall ([\d.]+) \| many [\d.na]+ \| medium [\d.]+ \| few [\d.]+  "
                  r"\((\d+) images\)", out)
    assert m and 0.0 <= float(m.group(1)) <= 100.0 and m.group(2) == "160", out  # 10 classes × 16 images


def test_losses_in_your_own_model_train_both_label_phases(tmp_path):
    out = _run("losses_in_your_model.py", "--steps", "4", cwd=tmp_path)
    assert "step 0 (area label): loss " in out and "step 3 (ConCutMix label): loss " in out
    losses = [float(v) for v in re.findall(r"loss ([\d.]+)", out)]
    assert len(losses) == 2 and all(v > 0 for v in losses)  # finite, positive: CE + SCL
    assert re.search(r"training-set accuracy [\d.]+% \(chance 12\.50%\)", out), out
