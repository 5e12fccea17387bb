"""The trainer (fastlt.training.trainer, fastlt.training.checkpoint, fastlt.training.evaluate, fastlt.cli) on CPU.

End-to-end runs go through the real entry point (`python -m fastlt.train`, one process,
DeepSpeed with gloo) and the real torch pipeline on a tiny cached synthetic dataset:
a short run whose loss falls, exact resume (epoch boundary and Ctrl-C mid-epoch), the NaN
stop, and the failure messages. The step itself (docs/design.md §1 losses and labels) is
checked in-process against formulas written here and in tests/spec_formulas.py.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import (TINY_CLASSES as NUM_CLASSES, TINY_STEPS as STEPS, assert_same_weights, events,
                      interrupt_when_paused, run_fastlt as fastlt, tiny_config, tree_digest, weights, write_config)
from spec_formulas import dense_rectify_labels, loop_balanced_supcon

# The exponential profile of docs/design.md §2 for n_max 40, imb_factor 0.2 (IF 5), 6 classes.
TRAIN_COUNTS = [math.floor(40 * 0.2 ** (c / 5)) for c in range(NUM_CLASSES)]
TRAIN_LINE = re.compile(r"^epoch +\d+/\d+ step +\d+/\d+ \| ce -?[\d.]+ \| scl -?[\d.]+ \| loss -?[\d.]+ \| "
                        r"lr [\d.e+-]+ \| +[\d.]+ img/s \| data wait +[\d.]+%"
                        r"( \| acc +[\d.]+%)?( \| γ .* top-K outside \{a,b\} [\d.]+%)?$")


@pytest.fixture(scope="module")
def data_root(tiny_data_root) -> Path:
    """The synthetic dataset of tiny_config (the session's, read-only)."""
    return tiny_data_root


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, data_root):
    """An uninterrupted, deterministic 2-epoch run (keeps both epoch checkpoints)."""
    out = tmp_path_factory.mktemp("runs")
    cfg = tiny_config(data_root, out, run={"name": "base", "log_every": 1, "deterministic": True})
    path = write_config(out / "base.yaml", cfg)
    proc = fastlt("--config", path)
    return {"dir": out / "base", "config": path, "cfg": cfg, "out": out, "proc": proc}


# --------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------


def test_short_run_loss_falls_and_writes_the_run_directory(tmp_path, data_root):
    cfg = tiny_config(data_root, tmp_path,
                      method={"l_d_warm": 1}, optim={"epochs": 4, "lr": 0.02},
                      pipeline={"num_workers": 2}, run={"name": "short", "eval_every": 2, "keep_last": 1})
    proc = fastlt("--config", write_config(tmp_path / "short.yaml", cfg))
    run = tmp_path / "short"
    out_lines = proc.stdout.splitlines()

    # Fixed-field lines on stdout, the same records in log.jsonl; no progress bar off a terminal.
    train_lines = [ln for ln in out_lines if ln.startswith("epoch ") and " step " in ln]
    assert train_lines and all(TRAIN_LINE.match(ln) for ln in train_lines), train_lines[:3]
    recs = events(run, "train")
    assert len(recs) == len(train_lines) == 4 * STEPS // 2
    for r in recs:
        assert {"epoch", "step", "ce", "scl", "loss", "lr", "img_per_s", "data_wait"} <= r.keys()
        assert r["loss"] == pytest.approx(cfg["method"]["alpha"] * r["ce"] + cfg["method"]["beta"] * r["scl"],
                                          rel=1e-4)
        assert 0.0 <= r["data_wait"] <= 1.0 and r["img_per_s"] > 0
    assert "it/s" not in proc.stdout and "\r" not in proc.stdout

    # The loss falls: last epoch's mean below the first epoch's.
    first = np.mean([r["loss"] for r in recs if r["epoch"] == 0])
    last = np.mean([r["loss"] for r in recs if r["epoch"] == 3])
    assert last < first, (first, last)

    # Area labels while epoch <= l_d_warm = 1, then the announced switch to ConCutMix labels.
    epochs = {r["epoch"]: r["rectify"] for r in events(run, "epoch")}
    assert epochs == {0: False, 1: False, 2: True, 3: True}
    switch = events(run, "label_switch")
    assert [s["epoch"] for s in switch] == [2]
    assert "ConCutMix labels ON from epoch 2" in proc.stdout

    # Evaluation every 2 epochs and at the end; metrics.json; best/last weights; resolved config.
    evals = events(run, "eval")
    assert [e["epoch"] for e in evals] == [1, 3]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["final"]["overall"] == pytest.approx(evals[-1]["overall"])
    assert set(metrics["final"]) >= {"overall", "many", "medium", "few"}
    assert metrics["best"]["overall"] == pytest.approx(max(e["overall"] for e in evals))
    assert metrics["train_class_counts"] == TRAIN_COUNTS
    for name in ("best.pt", "last.pt"):
        assert set(weights(run / name)) == set(weights(run / "last.pt"))
    from fastlt.config.loader import config_to_dict, load_config

    saved = load_config(run / "config.yaml")
    assert config_to_dict(saved) == config_to_dict(load_config(tmp_path / "short.yaml"))

    # keep_last = 1: one complete checkpoint, pointed at by `latest`, nothing half-written.
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["epoch0004_step000000", "latest"]
    assert (run / "checkpoints" / "latest").read_text() == "epoch0004_step000000"

    # `fastlt eval` on last.pt reproduces the final evaluation.
    ev = fastlt("eval", "--config", tmp_path / "short.yaml", "--checkpoint", run / "last.pt", "--out",
                tmp_path / "eval.json", module="fastlt.cli")
    got = json.loads((tmp_path / "eval.json").read_text())
    assert got["overall"] == pytest.approx(metrics["final"]["overall"])
    assert got["n"] == NUM_CLASSES * 4 and "overall" in ev.stdout


def test_resume_at_an_epoch_boundary_equals_the_uninterrupted_run(base_run, tmp_path):
    """2 epochs in one go == 1 epoch, then a fresh process resuming for the second."""
    epoch1 = base_run["dir"] / "checkpoints" / "epoch0001_step000000"
    assert (epoch1 / "meta.json").is_file()
    cfg = dict(base_run["cfg"], run=dict(base_run["cfg"]["run"], name="resumed", output_dir=str(tmp_path)))
    proc = fastlt("--config", write_config(tmp_path / "r.yaml", cfg), "--resume", epoch1)
    assert f"resumed from {epoch1}: epoch 1 step 0" in proc.stdout
    assert "epoch 0/2" not in proc.stdout  # the first epoch is not trained again
    assert_same_weights(weights(base_run["dir"] / "last.pt"), weights(tmp_path / "resumed" / "last.pt"))


def test_ctrl_c_saves_mid_epoch_and_resume_is_exact(base_run, tmp_path):
    # Data-loader worker processes this time: a terminal's Ctrl-C reaches them too, and batches
    # do not depend on the number of workers, so the result must still equal the base run.
    cfg = dict(base_run["cfg"], pipeline=dict(base_run["cfg"]["pipeline"], num_workers=2),
               run=dict(base_run["cfg"]["run"], name="intr", output_dir=str(tmp_path)))
    path = write_config(tmp_path / "i.yaml", cfg)
    # The trainer waits before epoch 0's step 2 for the Ctrl-C (the step then runs).
    code, out, err = interrupt_when_paused(path, "step:0:2")
    assert code == 130, out + err
    assert err.count("SIGINT received") == 1 and "Continue with --resume auto" in err
    assert "Traceback" not in err
    latest = (tmp_path / "intr" / "checkpoints" / "latest").read_text()
    epoch, step = map(int, re.match(r"epoch(\d+)_step(\d+)", latest).groups())
    assert latest == "epoch0000_step000003", latest
    done = fastlt("--config", path, "--resume", "auto")
    assert f"epoch {epoch} step {step}" in done.stdout
    assert_same_weights(weights(base_run["dir"] / "last.pt"), weights(tmp_path / "intr" / "last.pt"))


def test_nan_loss_stops_names_the_step_and_keeps_the_last_good_checkpoint(base_run, tmp_path):
    run = tmp_path / "nan"
    shutil.copytree(base_run["dir"], run)
    before = tree_digest(run / "checkpoints")
    cfg = dict(base_run["cfg"], optim=dict(base_run["cfg"]["optim"], epochs=3),
               run=dict(base_run["cfg"]["run"], name="nan", output_dir=str(tmp_path)))
    proc = fastlt("--config", write_config(tmp_path / "n.yaml", cfg), "--resume", "auto", "--set", "optim.lr=1e12",
                  check_rc=3)
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastlt: error: the loss became non-finite at epoch 2, step "), err
    assert "epoch0002_step000000" in err[0] and "untouched" in err[0]
    assert tree_digest(run / "checkpoints") == before  # nothing written, nothing pruned
    assert not (run / "checkpoints" / "epoch0003_step000000").exists()


def test_resume_from_another_models_checkpoint_is_refused(base_run, tmp_path):
    run = tmp_path / "other"
    shutil.copytree(base_run["dir"], run)
    before = tree_digest(run / "checkpoints")
    cfg = dict(base_run["cfg"], model=dict(base_run["cfg"]["model"], feat_dim=32),
               run=dict(base_run["cfg"]["run"], name="other", output_dir=str(tmp_path)))
    proc = fastlt("--config", write_config(tmp_path / "o.yaml", cfg), "--resume", "auto", check_rc=2)
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "belongs to a different model" in err[0] and "feat_dim: checkpoint 16" in err[0], err
    assert tree_digest(run / "checkpoints") == before


def test_existing_run_needs_resume_and_missing_data_is_one_message(base_run, tmp_path, capsys):
    """In-process: these checks run before any process group or DeepSpeed engine exists."""
    from fastlt.cli import main, train_main

    before = tree_digest(base_run["dir"])
    assert train_main(["--config", str(base_run["config"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds checkpoints" in err[0] and "--resume auto" in err[0], err
    assert tree_digest(base_run["dir"]) == before
    cfg = {"data": {"kind": "list", "root": str(tmp_path / "no-such-dataset"), "train_list": "train.txt",
                    "val_list": "val.txt", "num_classes": 10},
           "run": {"output_dir": str(tmp_path)}}
    assert main(["train", "--config", str(write_config(tmp_path / "missing.yaml", cfg))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastlt: error: data.root: ") and "no-such-dataset" in err[0], err
    assert train_main(["--config", str(base_run["config"]), "--set", "optim.lrr=0.1"]) == 2
    assert "unknown config key 'optim.lrr'; did you mean 'optim.lr'" in capsys.readouterr().err


def test_demo_command_prints_the_four_accuracies_and_the_run_directory(tmp_path, data_root):
    cfg = tiny_config(data_root, tmp_path, optim={"epochs": 1}, run={"max_steps_per_epoch": 2})
    proc = fastlt("demo", "--config", write_config(tmp_path / "demo.yaml", cfg), module="fastlt.cli")
    runs = list(tmp_path.glob("demo-*"))
    assert len(runs) == 1  # a fresh, timestamped run directory, so repeated demos never collide
    final = json.loads((runs[0] / "metrics.json").read_text())["final"]
    out = proc.stdout
    assert re.search(r"accuracy \(%\) +overall [\d.]+ \| many — \| medium [\d.]+ \| few [\d.]+", out), out
    assert f"overall {final['overall']:.2f}" in out
    assert "chance level      16.67" in out and f"run directory     {runs[0]}" in out
    assert "6 classes: 0 many-shot, 3 medium-shot, 3 few-shot" in out


def test_bf16_zero2_accumulation_and_clipping_run_end_to_end(tmp_path, data_root):
    """DeepSpeed's own bf16 mode (bf16 weights and BatchNorm buffers), ZeRO-2, 2 micro-steps per
    optimizer step, gradient clipping and channels-last bf16 inputs from the pipeline; then a
    resume that reads the ZeRO shards back."""
    cfg = tiny_config(data_root, tmp_path, optim={"epochs": 2}, model={"channels_last": True},
                      deepspeed={"precision": "bf16", "autocast": False, "zero_stage": 2, "grad_accum_steps": 2,
                                 "grad_clip": 1.0},
                      run={"name": "bf16", "log_every": 1, "eval_every": 2, "max_steps_per_epoch": 4})
    path = write_config(tmp_path / "bf16.yaml", cfg)
    fastlt("--config", path, "--set", "optim.epochs=1")
    steps = [r["global_step"] for r in events(tmp_path / "bf16", "train")]
    assert steps == [0, 1, 1, 2]  # global optimizer steps after each micro-step: one per 2
    assert torch.load(tmp_path / "bf16" / "last.pt", weights_only=True)["model"]["fc.weight"].dtype == torch.bfloat16
    proc = fastlt("--config", path, "--resume", "auto")
    assert "resumed from" in proc.stdout and "global step 2" in proc.stdout
    assert json.loads((tmp_path / "bf16" / "metrics.json").read_text())["history"][-1]["epoch"] == 1


# --------------------------------------------------------------------------------------
# Data errors (in-process: no process group needed)
# --------------------------------------------------------------------------------------


def _cfg(data_root, tmp_path, **data):
    from fastlt.config.loader import config_from_dict

    cfg = tiny_config(data_root, tmp_path)
    cfg["data"].update(data)
    return config_from_dict(cfg)


def test_wrong_num_classes_is_reported_with_the_key(data_root, tmp_path):
    from fastlt.data.build import build_datasets
    from fastlt.errors import DataError

    with pytest.raises(DataError, match=r"data.num_classes is 7, but the synthetic dataset .* has 6 classes"):
        build_datasets(_cfg(data_root, tmp_path, num_classes=7))
    ok = build_datasets(_cfg(data_root, tmp_path))
    assert ok.num_classes == NUM_CLASSES and list(ok.class_counts) == TRAIN_COUNTS

    # A list dataset whose labels exceed num_classes: the error names the key, file and line.
    (tmp_path / "train.txt").write_text("a.jpg 0\nb.jpg 1\nc.jpg 12\n")
    (tmp_path / "val.txt").write_text("a.jpg 0\n")
    with pytest.raises(DataError, match=r"data.train_list: .*train.txt: line 3 has label 12, but num_classes is 10"):
        build_datasets(_cfg(data_root, tmp_path, kind="list", root=str(tmp_path), train_list="train.txt",
                            val_list="val.txt", num_classes=10))
    (tmp_path / "train3.txt").write_text("a.jpg 0\nb.jpg 1\nc.jpg 2\n")
    with pytest.raises(DataError, match=r"data.val_list: list file .*nope.txt does not exist"):
        build_datasets(_cfg(data_root, tmp_path, kind="list", root=str(tmp_path), train_list="train3.txt",
                            val_list="nope.txt", num_classes=3))


# --------------------------------------------------------------------------------------
# The step (docs/design.md §1) against formulas written here
# --------------------------------------------------------------------------------------


class _Out:
    def __init__(self, logits, z_raw, centers_raw):
        self.logits, self.z_raw, self.centers_raw = logits, z_raw, centers_raw
        self.z, self.centers = F.normalize(z_raw, dim=1), F.normalize(centers_raw, dim=1)


def _step_inputs(b=6, c=5, d=4, seed=0):
    from fastlt.pipelines import TrainBatch

    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor([50, 20, 9, 4, 2])[:c]
    la = torch.randint(0, c, (b,), generator=g)
    lb = torch.randint(0, c, (b,), generator=g)
    mixed = torch.tensor([True, False, True, True, False, True])[:b]
    lb = torch.where(mixed, lb, la)
    lam = torch.where(mixed, torch.rand(b, generator=g), torch.ones(b))
    batch = TrainBatch(images=torch.zeros(3 * b, 3, 2, 2), label_a=la, label_b=lb, lam=lam.float(), mixed=mixed)
    logits = torch.randn(3 * b, c, generator=g, requires_grad=True)
    z_raw = torch.randn(3 * b, d, generator=g, requires_grad=True)
    centers_raw = torch.randn(c, d, generator=g, requires_grad=True)
    return batch, counts, logits, z_raw, centers_raw


@pytest.mark.parametrize("rectify", [False, True])
def test_objective_matches_the_spec(tmp_path, data_root, rectify):
    from fastlt.config.loader import config_from_dict
    from fastlt.method.objective import ConCutMixObjective

    cfg = config_from_dict(tiny_config(data_root, tmp_path, method={"alpha": 2.0, "beta": 0.6, "tau": 0.8,
                                                                     "topk": 2, "temperature": 0.1,
                                                                     "scaling_factor": [200, 255]}))
    batch, counts, logits, z_raw, centers_raw = _step_inputs()
    b, c = len(batch), counts.numel()
    loss, ce, scl, _ = (t.detach() for t in ConCutMixObjective(cfg.method, counts.numpy())(
        _Out(logits, z_raw, centers_raw), batch, rectify=rectify))

    # L_cls: logit-adjusted CE on the first B logits. Area label: λ·CE(a) + (1−λ)·CE(b).
    adj = logits[:b] + 0.8 * torch.log(counts.double() / counts.sum()).float()
    logp = F.log_softmax(adj, dim=1)
    if not rectify:
        want_ce = -(batch.lam * logp[torch.arange(b), batch.label_a]
                    + (1 - batch.lam) * logp[torch.arange(b), batch.label_b]).mean()
    else:
        rect = dense_rectify_labels(z_raw[:b], centers_raw, batch.label_a, batch.label_b, batch.lam, counts,
                                    topk=2, omega=200 / 255)
        onehot = F.one_hot(batch.label_a, c).float()  # unmixed samples keep their label
        target = torch.where(batch.mixed[:, None], rect, onehot)
        want_ce = -(target * logp).sum(1).mean()
    # L_BalSCL on views 1 and 2 (normalised z), labels = background classes.
    z = F.normalize(z_raw, dim=1)
    feats = torch.stack([z[b:2 * b], z[2 * b:]], dim=1)
    want_scl = float(loop_balanced_supcon(F.normalize(centers_raw, dim=1), feats, batch.label_a, 0.1).detach())
    assert ce.item() == pytest.approx(want_ce.detach().item(), rel=1e-5)
    assert scl.item() == pytest.approx(float(want_scl), rel=1e-5)
    assert loss.item() == pytest.approx(2.0 * want_ce.detach().item() + 0.6 * float(want_scl), rel=1e-5)


def test_rectified_label_sends_no_gradient_into_z_or_centers(tmp_path, data_root):
    from fastlt.config.loader import config_from_dict
    from fastlt.method.objective import ConCutMixObjective

    cfg = config_from_dict(tiny_config(data_root, tmp_path, method={"beta": 0.0, "topk": 2}))
    batch, counts, logits, z_raw, centers_raw = _step_inputs()
    loss, _, _, _ = ConCutMixObjective(cfg.method, counts.numpy())(_Out(logits, z_raw, centers_raw), batch,
                                                                   rectify=True)
    loss.backward()
    assert z_raw.grad is None or torch.count_nonzero(z_raw.grad) == 0
    assert centers_raw.grad is None or torch.count_nonzero(centers_raw.grad) == 0
    assert torch.count_nonzero(logits.grad[: len(batch)]) > 0 and torch.count_nonzero(logits.grad[len(batch):]) == 0


# --------------------------------------------------------------------------------------
# Checkpoint bookkeeping with a stand-in engine (the DeepSpeed part is covered end to end)
# --------------------------------------------------------------------------------------


class _Engine:
    """Writes what DeepSpeed would, file by file; optionally signals itself halfway through."""

    def __init__(self, signal_midway: bool = False):
        self.signal_midway = signal_midway

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert not save_latest  # fastlt owns the `latest` pointer
        d = Path(save_dir) / tag
        d.mkdir(parents=True)
        torch.save({"module": {"w": torch.ones(2)}, **client_state}, d / "mp_rank_00_model_states.pt")
        if self.signal_midway:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        torch.save({"optimizer": {}}, d / "zero_pp_rank_0_mp_rank_00_optim_states.pt")


def test_checkpoint_save_is_atomic_pruned_and_survives_ctrl_c(tmp_path):
    from fastlt.training.checkpoint import CheckpointManager, load_weights
    from fastlt.training.signals import StopFlag

    mgr = CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    stale = tmp_path / "checkpoints" / "epoch0001_step000000.partial"
    stale.mkdir(parents=True)  # a crash during an earlier save
    assert CheckpointManager.resolve("auto", tmp_path) is None
    with StopFlag() as stop:
        path = mgr.save(_Engine(signal_midway=True), 1, 0, {"fastlt": {"epoch": 1}}, {"signature": {}})
        assert stop.requested  # the signal was noted, not raised: the save completed
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "mp_rank_00_model_states.pt", "rng_rank00000.pt",
                                                      "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    assert not stale.exists()
    for epoch in (2, 3):
        mgr.save(_Engine(), epoch, 0, {"fastlt": {"epoch": epoch}}, {"signature": {}})
    assert [p.name for p in mgr.complete()] == ["epoch0002_step000000", "epoch0003_step000000"]
    assert CheckpointManager.resolve("auto", tmp_path) == tmp_path / "checkpoints" / "epoch0003_step000000"
    state, meta = load_weights(tmp_path)  # a run directory: its latest checkpoint
    assert torch.equal(state["w"], torch.ones(2)) and meta["epoch"] == 3 and meta["step"] == 0


def test_resolve_rejects_what_is_not_a_complete_checkpoint(tmp_path):
    from fastlt.training.checkpoint import CheckpointManager
    from fastlt.errors import CheckpointError

    with pytest.raises(CheckpointError, match="does not exist"):
        CheckpointManager.resolve(str(tmp_path / "missing"), tmp_path)
    partial = tmp_path / "ck" / "epoch0002_step000000.partial"
    partial.mkdir(parents=True)
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        CheckpointManager.resolve(str(partial), tmp_path)
    with pytest.raises(CheckpointError, match="not a fastlt checkpoint"):
        CheckpointManager.resolve(str(tmp_path), tmp_path)
    (tmp_path / "ck" / "latest").write_text("epoch0002_step000000")
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        CheckpointManager.resolve(str(tmp_path / "ck"), tmp_path)


class _Payload:
    """Unpickling this would run arbitrary code if checkpoints were loaded unsafely."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoints_are_loaded_without_arbitrary_pickle(tmp_path):
    from fastlt.training.checkpoint import load_weights
    from fastlt.errors import CheckpointError
    from fastlt.files import safe_load

    bad = tmp_path / "bad.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "meta": _Payload()}, bad)
    with pytest.raises(CheckpointError, match="cannot load .* safely"):
        safe_load(bad)
    with pytest.raises(CheckpointError):
        load_weights(bad)


# --------------------------------------------------------------------------------------
# Logger
# --------------------------------------------------------------------------------------


def test_logger_fixed_fields_jsonl_and_rank0_only(tmp_path):
    import io

    from fastlt.reports.logger import RunLogger

    rec = {"epoch": 3, "epochs": 30, "step": 40, "steps": 400, "ce": 1.5, "scl": float("nan"), "loss": 2.0,
           "lr": 0.1, "img_per_s": 1234.5, "data_wait": 0.125}
    buf = io.StringIO()
    log = RunLogger(tmp_path, rank=0, stream=buf)
    log.start_bar(10, 0, "x")  # StringIO is not a terminal: no bar
    log.train(rec)
    log.close()
    line = buf.getvalue().strip()
    assert line == ("epoch  3/30 step  40/400 | ce 1.5000 | scl nan | loss 2.0000 | lr 1.000e-01 | "
                    "  1234.5 img/s | data wait  12.5%")
    (saved,) = events(tmp_path)
    assert saved["event"] == "train" and saved["scl"] is None and saved["data_wait"] == 0.125
    other = io.StringIO()
    quiet = RunLogger(tmp_path / "r1", rank=1, stream=other)
    quiet.train(rec)
    quiet.info("hello")
    quiet.close()
    assert other.getvalue() == "" and not (tmp_path / "r1").exists()
