"""``fastlt profile`` (fastlt.reports.profiling) on CPU: the real entry point, the trainer's own setup, the
real torch pipeline on the tiny synthetic dataset.

* the trace files: ``trace.json`` parses as JSON and names fastlt's ranges and PyTorch's
  operators; the TensorBoard plugin's ``*.pt.trace.json`` is there;
* the printed table and ``summary.json``: launches per step > 0 (the CPU proxy, labelled as
  such), a host-sync count, the label phase honoured (the rectified step runs the label
  rectification: more operators than the area step);
* arguments that cannot be met end in one ``fastlt: error:`` line (exit code 2) before anything
  is built.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_fastlt, tiny_config, write_config
from fastlt.cli import main

RANGES = ("fastlt::data", "fastlt::train_step", "fastlt::forward", "fastlt::objective", "fastlt::backward",
          "fastlt::optimizer_step")


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_data_root) -> Path:
    out = tmp_path_factory.mktemp("profile")
    return write_config(out / "tiny.yaml", tiny_config(tiny_data_root, out / "runs", run={"name": "tiny"}))


def _profile(config: Path, *args: str):
    return run_fastlt("profile", "--config", config, *args, module="fastlt.cli", timeout=600)


@pytest.fixture(scope="module")
def rectified(config):
    """Two recorded steps after one warm-up, default phase and folder."""
    proc = _profile(config, "--steps", "2", "--warmup", "1")
    out = config.parent / "runs" / "tiny-profile" / "profile"
    return proc, out, json.loads((out / "summary.json").read_text())


def test_profile_writes_the_traces_and_prints_the_table(rectified):
    proc, out, summary = rectified
    trace = json.loads((out / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert set(RANGES) <= names, sorted(n for n in names if n and n.startswith("fastlt"))
    assert {"aten::convolution_backward", "ProfilerStep#0", "ProfilerStep#1"} <= names
    (tb,) = out.glob("fastlt.*.pt.trace.json")
    assert "traceEvents" in json.loads(tb.read_text())

    assert summary["phase"] == "rectified" and summary["epochs"] == [1] and summary["steps"] == 2
    launches, syncs = summary["launches"], summary["host_syncs"]
    assert len(launches["per_step"]) == 2 and min(launches["per_step"]) > 0
    assert launches["measured"].startswith("CPU proxy")
    # The CPU step's only scalar reads are the label range checks that run on CPU tensors only,
    # all in the objective: the compact label's (int() of min and max of index, label_a and
    # label_b, kernels/compact.py: 6) and BalSCL's (int() of both ends of aminmax,
    # fastlt/method/losses.py: 2) — 8 per step.
    assert syncs["per_step"] == [8, 8] and syncs["total"] == 16, syncs
    assert syncs["sites"] == {"fastlt::objective > aten::item": 16}, syncs["sites"]
    assert summary["top"] and all(r["self_ms_per_step"] >= 0 for r in summary["top"])
    assert set(summary["phases_host_ms_per_step"]) == {r.split("::")[1] for r in RANGES}

    text = proc.stdout
    assert "top 15 operators by CPU self time" in text and "aten::convolution_backward" in text
    assert f"kernel launches per step: {launches['mean']:.0f} (" in text and "CPU proxy" in text
    assert f"host-device syncs in the step: {syncs['total']} over 2 steps" in text
    assert str(out / "trace.json") in text


def test_profile_prints_no_kineto_lines(rectified):
    """libkineto marks each profiler start and stop with a "USDT:... profiler_start" line on stderr
    unless its log threshold is above that severity (fastlt.reports.profiling.quiet_kineto)."""
    proc = rectified[0]
    lines = (proc.stdout + proc.stderr).splitlines()
    assert not [line for line in lines if "USDT" in line or "SyncActivityProfilerHandler" in line], proc.stderr


def test_profile_area_phase_into_another_folder(config, rectified, tmp_path):
    out = tmp_path / "area"
    _profile(config, "--steps", "1", "--warmup", "0", "--phase", "area", "--out", str(out), "--top", "5")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["phase"] == "area" and summary["epochs"] == [0] and summary["warmup_ms_per_step"] is None
    assert len(summary["top"]) == 5 and (out / "trace.json").is_file()
    # The label rectification's operators run in the rectified phase only.
    assert rectified[2]["launches"]["mean"] > summary["launches"]["mean"]


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps: must be >= 1; got 0"),
    (["--warmup", "-1"], "--warmup: must be >= 0; got -1"),
    (["--phase", "mixed"], "--phase: must be one of area, rectified; got 'mixed'"),
    (["--set", "method.l_d_warm=1"], "--phase rectified: this run never reaches ConCutMix labels"),
    (["--phase", "area", "--set", "method.l_d_warm=-1"], "--phase area: method.l_d_warm=-1 rectifies"),
])
def test_bad_arguments_give_one_error_line(config, capsys, args, message):
    assert main(["profile", "--config", str(config), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastlt: error: ") and message in err[0], err


def test_tensorboard_profiler_plugin_reads_the_trace(rectified, tmp_path):
    """torch-tb-profiler's own loader (not a fastlt dependency: skipped where it is not installed)."""
    pytest.importorskip("pandas")
    data = pytest.importorskip("torch_tb_profiler.profiler.data")
    from torch_tb_profiler.profiler.run_generator import RunGenerator

    (tb,) = rectified[1].glob("fastlt.*.pt.trace.json")
    run = RunGenerator("fastlt", "1", data.RunProfileData.parse("fastlt", "1", str(tb), str(tmp_path)))
    profile = run.generate_run_profile()
    assert {"Overview", "Operator", "Trace"} <= {v.display_name for v in profile.views}
    assert [row[0] for row in profile.overview["steps"]["rows"]] == ["0", "1"]
