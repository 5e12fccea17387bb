"""What a run leaves for a person to look at: TensorBoard event files, the label diagnostics of
every log interval, the PNG plots and per-class CSV (end of a run and ``fastlt eval``), the
class map of a folder dataset, the pretrained start in the log, and ``fastlt inspect``'s grid
and page — all from one short real run (folder dataset, pretrained backbone, area labels in
epoch 0 and ConCutMix labels in epoch 1), read back with the readers people use (tensorboard's
event reader, PIL, csv).
"""
from __future__ import annotations

import csv
import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_CLASSES, TINY_STEPS, events, run_fastlt, tiny_config, write_config
from spec_formulas import dense_rectify_labels

NAMES = [f"{c:03d}" for c in range(TINY_CLASSES)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from safetensors.torch import save_file

    from fastlt.data import make_synthetic_lt
    from fastlt.models import resnet32

    base = tmp_path_factory.mktemp("outputs")
    made = make_synthetic_lt(base / "data", num_classes=TINY_CLASSES, imb_factor=0.2, n_max=40, image_size=16,
                             seed=0, n_val=4)
    torch.manual_seed(11)
    backbone = base / "backbone.safetensors"
    save_file(resnet32().state_dict(), str(backbone))
    cfg = tiny_config(made.root, base / "runs", data={"kind": "folder", "root": str(made.root)},
                      model={"pretrained": str(backbone)}, run={"name": "short", "log_every": 2})
    path = write_config(base / "short.yaml", cfg)
    proc = run_fastlt("--config", path)
    return {"dir": base / "runs" / "short", "config": path, "cfg": cfg, "proc": proc, "base": base,
            "counts": made.class_counts}


def test_tensorboard_event_files_hold_the_scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run["dir"]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    want = {"train/loss", "train/ce", "train/scl", "train/lr", "train/accuracy", "perf/img_per_s", "perf/data_wait",
            "label/gamma", "label/l1_shift", "label/argmax_changed", "label/topk_outside", "label/rectified_share",
            "eval/overall", "eval/many", "eval/medium", "eval/few"}
    assert want - {"eval/many"} <= tags, sorted(want - tags)  # no many-shot class here: nan is not written
    assert "eval/many" not in tags
    train = events(run["dir"], "train")
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [r["global_step"] for r in train]
    assert np.allclose([e.value for e in loss], [r["loss"] for r in train], rtol=1e-6)
    # The label diagnostics exist only for the rectified epoch (epoch > l_d_warm = 0).
    rect_steps = [r["global_step"] for r in train if r["gamma"] is not None]
    assert [e.step for e in acc.Scalars("label/gamma")] == rect_steps and rect_steps
    evals = events(run["dir"], "eval")
    assert [e.value for e in acc.Scalars("eval/overall")] == pytest.approx([r["overall"] for r in evals])


def test_tensorboard_holds_the_config_the_hparams_and_eval_by_epoch(run):
    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run["dir"]), size_guidance={"tensors": 0})
    acc.Reload()
    (text,) = acc.Tensors("config/text_summary")
    shown = yaml.safe_load("\n".join(line[4:] for line in text.tensor_proto.string_val[0].decode().splitlines()))
    assert shown == yaml.safe_load((run["dir"] / "config.yaml").read_text())
    evals = events(run["dir"], "eval")
    by_epoch = acc.Scalars("eval_by_epoch/overall")
    assert [e.step for e in by_epoch] == [r["epoch"] for r in evals]
    assert [e.value for e in by_epoch] == pytest.approx([r["overall"] for r in evals])
    hp = EventAccumulator(str(run["dir"] / "hparams"))
    hp.Reload()
    final = json.loads((run["dir"] / "metrics.json").read_text())["final"]
    assert hp.Scalars("hparam/final_overall")[0].value == pytest.approx(final["overall"])
    plugin = hp.summary_metadata["_hparams_/session_start_info"].plugin_data.content
    assert b"optim.lr" in plugin and b"method.topk" in plugin


def test_a_changed_config_is_kept_and_each_change_logged(tmp_path):
    from fastlt.config.loader import load_config
    from fastlt.config.recipes import resolve_config
    from fastlt.reports.logger import RunLogger
    from fastlt.reports.run_report import record_launch

    log = RunLogger(tmp_path, tensorboard=False, stream=open(tmp_path / "out.txt", "w"))
    first = load_config(resolve_config("demo"), ["optim.epochs=3", "optim.lr=0.1"])
    assert record_launch(first, {"train_batch_size": 8}, tmp_path, log, 0) == []
    assert not (tmp_path / "config_history").exists()
    second = load_config(resolve_config("demo"), ["optim.epochs=24", "optim.lr=0.05"])
    changed = record_launch(second, {"train_batch_size": 8}, tmp_path, log, 10)
    assert changed == ["optim.epochs: 3 -> 24", "optim.lr: 0.1 -> 0.05"]
    (kept,) = (tmp_path / "config_history").iterdir()
    import yaml

    assert yaml.safe_load(kept.read_text())["optim"]["epochs"] == 3
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["epochs"] == 24
    log.close()
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert "  config changed: optim.epochs: 3 -> 24" in lines and "  config changed: optim.lr: 0.1 -> 0.05" in lines


def test_label_diagnostics_are_logged_per_interval(run):
    train = events(run["dir"], "train")
    assert len(train) == 2 * TINY_STEPS // 2
    omega = 20 / 255
    counts = np.asarray(run["counts"], dtype=float)
    gamma_max = omega * math.log(counts.max()) / np.log(counts).sum()
    for r in train:
        assert 0.0 <= r["train_acc"] <= 100.0
        if r["epoch"] == 0:  # area labels: nothing was rectified
            assert r["gamma"] is None and r["label_l1"] is None and r["rectified_share"] == 0.0
            continue
        if r["gamma"] is None:  # no CutMix drawn in this interval's steps
            continue
        assert 0.0 < r["gamma"] <= gamma_max * (1 + 1e-6)
        assert 0.0 < r["label_l1"] <= 2 * r["gamma"] * (1 + 1e-6)  # ‖ŷ − y‖₁ = γ‖ŝ − y‖₁ ≤ 2γ
        assert 0.0 <= r["argmax_changed"] <= 1.0 and 0.0 <= r["topk_outside"] <= 1.0 + 1e-6
        assert 0.0 < r["rectified_share"] <= 1.0
    assert any(r["gamma"] is not None for r in train if r["epoch"] == 1)
    lines = [ln for ln in run["proc"].stdout.splitlines() if ln.startswith("epoch 1/2 step")]
    assert lines and all(" | acc " in ln for ln in lines)
    tail = re.compile(r"\| γ [\d.e+-]+ ‖ŷ−y‖₁ [\d.e+-]+ argmax changed [\d.]+% "
                      r"top-K outside \{a,b\} [\d.]+%$")
    assert any(tail.search(ln) for ln in lines), lines


def test_step_stats_match_the_formulas():
    """fastlt.method.label_stats against docs/design.md §1 written out sample by sample."""
    from fastlt.kernels import CompactLabel, reference_rectify_labels_compact
    from fastlt.method.label_stats import STAT_COLUMNS, interval_fields, step_stats
    from fastlt.pipelines import TrainBatch

    g = torch.Generator().manual_seed(4)
    b, c, d = 7, 6, 5
    counts = torch.tensor([60.0, 30, 14, 9, 4, 2])
    la, lb = torch.randint(0, c, (b,), generator=g), torch.randint(0, c, (b,), generator=g)
    mixed = torch.tensor([True, True, False, True, True, False, True])
    lb = torch.where(mixed, lb, la)
    lam = torch.where(mixed, torch.rand(b, generator=g), torch.ones(b))
    z, centers = torch.randn(b, d, generator=g), torch.randn(c, d, generator=g)
    logits = torch.randn(b, c, generator=g)
    omega = 200 / 255
    batch = TrainBatch(images=torch.zeros(3 * b, 3, 2, 2), label_a=la, label_b=lb, lam=lam, mixed=mixed)
    # The expected label from the spec alone: the dense B×C×D formulation on mixed rows, the area
    # label written out (λ on a, 1 − λ on b) on the others.
    dense = dense_rectify_labels(z, centers, la, lb, lam, counts, topk=3, omega=omega)
    y = torch.zeros(b, c)
    for i in range(b):
        y[i, la[i]] += lam[i]
        y[i, lb[i]] += 1 - lam[i]
    target = torch.where(mixed[:, None], dense, y)
    # The step's label in the form the objective keeps it: compact, area label kept on unmixed rows.
    # (The spec's distance rounds differently from the library's expansion: a few 1e-7.)
    label = reference_rectify_labels_compact(z, centers, la, lb, lam, counts, topk=3, omega=omega)
    label = label.keep_area_where(~mixed)
    torch.testing.assert_close(label.to_dense(), target, atol=1e-6, rtol=1e-5)
    got = step_stats(logits, label, batch, rectified=True)
    assert got.shape == (len(STAT_COLUMNS),)

    want = dict.fromkeys(STAT_COLUMNS, 0.0)
    a_, b_, lam_ = la.tolist(), lb.tolist(), lam.tolist()
    for i in range(b):
        t = target[i].tolist()
        want["correct"] += float(int(torch.argmax(logits[i])) == max(range(c), key=lambda j: (t[j], -j)))
        want["samples"] += 1
        if not mixed[i]:
            continue
        yi = [lam_[i] * (j == a_[i]) + (1 - lam_[i]) * (j == b_[i]) for j in range(c)]
        gamma = omega * math.log(sum(n * w for n, w in zip(counts.tolist(), yi))) / sum(map(math.log, counts.tolist()))
        s_hat = [(dense[i, j].item() - (1 - gamma) * yi[j]) / gamma for j in range(c)]
        want["mixed"] += 1
        want["gamma"] += gamma
        want["label_l1"] += sum(abs(dense[i, j].item() - yi[j]) for j in range(c))
        want["argmax_changed"] += float(int(torch.argmax(dense[i])) != int(torch.argmax(torch.tensor(yi))))
        want["topk_outside"] += sum(s_hat[j] for j in range(c) if j not in (a_[i], b_[i]))
    assert got.tolist() == pytest.approx([want[k] for k in STAT_COLUMNS], rel=1e-4, abs=1e-6)
    fields = interval_fields(torch.stack([got, got]))
    assert fields["gamma"] == pytest.approx(want["gamma"] / want["mixed"], rel=1e-5)
    assert fields["rectified_share"] == pytest.approx(5 / 7)
    # Area labels: the label columns stay zero and the fields are None.
    area = step_stats(logits, CompactLabel.area(la, lb, lam, c), batch, rectified=False)
    assert interval_fields(area[None])["gamma"] is None and area[2:].abs().sum() == 0


def _png_size(path):
    with Image.open(path) as im:
        im.load()
        pixels = np.asarray(im.convert("L"))
        return im.size, len(np.unique(pixels))


def test_run_writes_plots_csv_class_map_and_the_pretrained_start(run):
    from fastlt.reports.plots import SIZES

    d = run["dir"]
    for name in ("per_class_accuracy.png", "shot_groups.png", "training_curves.png"):
        size, levels = _png_size(d / name)
        assert size == SIZES[name] and levels > 20, name
    rows = list(csv.DictReader(open(d / "per_class.csv")))
    final = json.loads((d / "metrics.json").read_text())["final"]
    assert [r["name"] for r in rows] == NAMES
    assert [int(r["train_images"]) for r in rows] == list(run["counts"])
    assert [int(r["eval_images"]) for r in rows] == [4] * TINY_CLASSES
    per_class = [float(r["accuracy"]) for r in rows]
    few = [a for a, r in zip(per_class, rows) if r["group"] == "few"]
    assert np.mean(few) == pytest.approx(final["few"], abs=1e-3)
    classes = json.loads((d / "classes.json").read_text())
    assert [c["name"] for c in classes] == NAMES and [c["train_images"] for c in classes] == list(run["counts"])
    (msg,) = [r["msg"] for r in events(d, "info") if r["msg"].startswith("pretrained:")]
    assert re.match(r"pretrained: \d+ tensors from .*backbone.safetensors into the resnet32 backbone; missing none",
                    msg)
    plots = events(d, "plots")
    assert plots and plots[-1]["msg"].startswith("plots: per_class_accuracy.png")


def test_run_saves_the_deepspeed_config_it_used(run):
    ds = json.loads((run["dir"] / "ds_config.json").read_text())
    batch = run["cfg"]["data"]["batch_size"]  # one rank: the whole global batch per micro-step
    assert ds["train_micro_batch_size_per_gpu"] == batch and ds["train_batch_size"] == batch
    assert ds["timers"] == {"throughput": {"enabled": False}}


def _cli(capsys, *args) -> str:
    """``fastlt args...`` in this process (the command-line entry point, without another interpreter start)."""
    from fastlt.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err
    return out.out


def test_eval_writes_per_class_csv_and_plots(run, tmp_path, capsys):
    from fastlt.reports.plots import SIZES

    d = run["dir"]
    out = _cli(capsys, "eval", "--config", d / "config.yaml", "--checkpoint", d / "last.pt", "--out",
               tmp_path / "m.json", "--report-dir", tmp_path / "report")
    assert "plots and per-class CSV:" in out
    metrics = json.loads((tmp_path / "m.json").read_text())
    rows = list(csv.DictReader(open(tmp_path / "report" / "per_class.csv")))
    assert [r["name"] for r in rows] == NAMES
    assert [float(r["accuracy"]) for r in rows] == pytest.approx(metrics["per_class"], abs=1e-4)
    for name in ("per_class_accuracy.png", "shot_groups.png", "training_curves.png"):
        assert _png_size(tmp_path / "report" / name)[0] == SIZES[name]


def test_inspect_renders_the_labels_of_real_batches(run, tmp_path, capsys):
    from fastlt.reports.label_inspect import CELL, COLUMNS, HEADER

    d = run["dir"]
    out = _cli(capsys, "inspect", "--config", d / "config.yaml", "--checkpoint", d / "best.pt", "--samples", "6",
               "--out", tmp_path / "ins")
    assert out.strip().startswith("6 mixed samples:")
    out = tmp_path / "ins"
    size, levels = _png_size(out / "labels.png")
    assert size == (COLUMNS * CELL[0], HEADER + 2 * CELL[1]) and levels > 20
    page = (out / "labels.html").read_text()
    assert page.count("src='data:image/png;base64,") == 6
    assert not re.search(r"(src|href)=['\"](?!data:)", page)  # self-contained: nothing loaded from elsewhere
    info = json.loads((out / "labels.json").read_text())
    samples = info["samples"]
    assert len(samples) == 6
    assert len({s["step"] for s in samples}) > 1  # spread over the steps: not one CutMix box six times
    for s in samples:
        assert s["a_name"] in NAMES and s["b_name"] in NAMES and 0.0 < s["lam"] < 1.0
        assert s["gamma"] > 0 and s["label_l1"] <= 2 * s["gamma"] * (1 + 1e-6)
        assert len(s["top"]) == 3 and sum(v for _, v in s["top"]) <= 1.0 + 1e-5
        assert s["a_name"] in page and f"{s['lam']:.3f}" in page


def test_tensorboard_can_be_turned_off(tmp_path):
    import io

    from fastlt.config.loader import config_from_dict
    from fastlt.reports.logger import RunLogger

    synth = {"kind": "synthetic", "root": str(tmp_path)}
    assert config_from_dict({"data": synth, "run": {"tensorboard": False}}).run.tensorboard is False
    assert config_from_dict({"data": synth}).run.tensorboard is True
    rec = {"epoch": 0, "epochs": 1, "step": 1, "steps": 1, "global_step": 1, "ce": 1.0, "scl": 1.0, "loss": 2.0,
           "lr": 0.1, "img_per_s": 10.0, "data_wait": 0.0}
    for on in (False, True):
        log = RunLogger(tmp_path / str(on), stream=io.StringIO(), tensorboard=on)
        log.train(rec)
        log.close()
        assert bool(list((tmp_path / str(on)).glob("events.out.tfevents.*"))) is on


def test_a_resumed_run_replaces_the_steps_it_replays_in_tensorboard(tmp_path):
    """A run resumed from a checkpoint logs the steps after it again; TensorBoard shows the new values."""
    import io
    import time

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fastlt.reports.logger import RunLogger

    def launch(steps, offset):
        log = RunLogger(tmp_path, stream=io.StringIO(), tensorboard=True)
        for s in steps:
            log.train({"epoch": 0, "epochs": 1, "step": s, "steps": 10, "global_step": s, "ce": 1.0, "scl": 1.0,
                       "loss": offset + s, "lr": 0.1, "img_per_s": 10.0, "data_wait": 0.0})
        log.close()

    launch(range(1, 9), 0.0)  # stopped after step 8, last checkpoint at step 4
    time.sleep(1.1)  # event files are named by the second they were opened in
    launch(range(5, 11), 100.0)
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert got == [(s, float(s)) for s in range(1, 5)] + [(s, 100.0 + s) for s in range(5, 11)]
