"""Faults a user meets: bad inputs, damaged files, dying processes, signals. Each must end in
one ``fastlt: error:`` line that names the file, key or path and the fix (no traceback), with
the exit code of ``fastlt.errors``, and leave what the run directory already held intact.

Checks that run before DeepSpeed starts (config, data, run directory, resume target) are
driven in-process through ``fastlt.cli``; behaviour that needs a training process (a
diverging run, signals, a killed worker, a full disk) runs ``python -m fastlt.train`` as a
subprocess on the tiny synthetic config of conftest. Test names carry the number of the
fault they cover in the reliability review; every docstring says how the fault showed
before it was fixed (each was reproduced against the code as it was).
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from conftest import (REPO, TINY_STEPS, assert_same_weights, child_env, error_line, events, run_fastlt as fastlt,
                      tiny_config, tree_digest, weights, write_config)

NUM_CLASSES = 6



@pytest.fixture(scope="module")
def data_root(tiny_data_root) -> Path:
    """The synthetic dataset of tiny_config (the session's, read-only)."""
    return tiny_data_root


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, data_root):
    """A finished 2-epoch run (checkpoints epoch0001 and epoch0002, best.pt, last.pt, metrics.json)."""
    out = tmp_path_factory.mktemp("runs")
    cfg = tiny_config(data_root, out, run={"name": "base", "log_every": 1})
    path = write_config(out / "base.yaml", cfg)
    fastlt("--config", path)
    return {"dir": out / "base", "cfg": cfg, "config": path}


def copy_run(base_run, tmp_path, name: str, **sections) -> tuple[Path, Path]:
    """A copy of the base run under tmp_path/name and a config that resumes it (sections updated)."""
    run = tmp_path / name
    shutil.copytree(base_run["dir"], run)
    cfg = json.loads(json.dumps(base_run["cfg"]))
    cfg["run"].update(name=name, output_dir=str(tmp_path))
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return run, write_config(tmp_path / f"{name}.yaml", cfg)


def list_dataset(data_root: Path, dest: Path) -> Path:
    """A copy of the synthetic images as a list dataset that a test may damage."""
    shutil.copytree(data_root, dest)
    return dest


def list_cfg(root: Path, out: Path, **sections) -> dict:
    cfg = tiny_config(root, out, **sections)
    cfg["data"].update(kind="list", root=str(root), train_list="train.txt", val_list="val.txt",
                       num_classes=NUM_CLASSES)
    return cfg


def tensors(obj):
    """Every tensor inside nested dicts/lists (a checkpoint's state)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors(v)


@pytest.fixture()
def read_only_dir(tmp_path):
    """A folder no process can create files in: mode 0555, or for root (who ignores modes) the
    immutable attribute; skips where neither is possible."""
    ro = tmp_path / "read-only"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
        yield ro
        ro.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode:
        pytest.skip("running as root without chattr +i: no way to make a folder read-only for this process")
    try:
        yield ro
    finally:
        subprocess.run(["chattr", "-i", str(ro)], check=True)


def cut(path: Path, how: str) -> None:
    """Damage an image file: corrupt (not an image), truncated, empty or missing."""
    data = path.read_bytes()
    if how == "corrupt":
        path.write_bytes(b"this is not an image" * 10)
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()


# --------------------------------------------------------------------------------------
# 1-3: nothing lost, no wrong "good" state
# --------------------------------------------------------------------------------------


def test_1_divergence_on_an_epochs_last_step_saves_no_nonfinite_checkpoint(tmp_path, data_root, monkeypatch):
    """One step per epoch at lr 1e6: the update of an epoch's last step makes the weights inf
    while its loss (computed before the update) is finite. Before the change that epoch's
    checkpoint was written with 32 non-finite tensors, keep_last=1 deleted the good one, and
    the error named the bad one as "the last good checkpoint"."""
    from fastlt.training.checkpoint import tag_for
    from fastlt.files import safe_load

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    cfg = tiny_config(data_root, tmp_path, optim={"epochs": 6, "lr": 1e6},
                      run={"name": "div", "max_steps_per_epoch": 1, "keep_last": 1, "log_every": 1})
    proc = fastlt("--config", write_config(tmp_path / "div.yaml", cfg), check_rc=3)
    line = error_line(proc.stderr)
    m = re.search(r"the weights or optimizer state became non-finite in epoch (\d+) \((\d+) tensor\(s\)", line)
    assert m and int(m.group(2)) > 0, line
    named = Path(re.search(r"The last good checkpoint is (\S+);", line).group(1))
    assert named.name == tag_for(int(m.group(1)), 0) and "optim.lr=1000000.0" in line
    left = sorted(p for p in (tmp_path / "div" / "checkpoints").iterdir() if p.is_dir())
    assert left == [named]
    for ckpt in left:
        state = [t for f in sorted(ckpt.glob("*.pt")) for t in tensors(safe_load(f)) if t.is_floating_point()]
        assert state and all(torch.isfinite(t).all() for t in state), ckpt


def test_2_refused_resume_changes_nothing_in_the_run_directory(base_run, tmp_path, capsys):
    """Before the change a resume refused for another model.feat_dim had already rewritten the
    run's config.yaml with the rejected value (and appended to its logs), while the error
    told the user to resume with "config.yaml in its run directory"."""
    from fastlt.cli import train_main

    run, cfg = copy_run(base_run, tmp_path, "other", model={"feat_dim": 32})
    before = tree_digest(run)
    assert train_main(["--config", str(cfg), "--resume", "auto"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "belongs to a different model" in line and "feat_dim: checkpoint 16, this config 32" in line
    assert "config.yaml in its run directory" in line
    assert tree_digest(run) == before


def test_3_bad_validation_image_fails_before_training(data_root, tmp_path, capsys):
    """Before the change a bad validation image with on_error: raise was found only at the first
    evaluation, after an epoch of training, and a 60-line traceback lost that epoch."""
    from fastlt.cli import train_main

    root = list_dataset(data_root, tmp_path / "ds")
    cut(root / "val" / "005" / "00003.jpg", "corrupt")
    cfg = write_config(tmp_path / "v.yaml", list_cfg(root, tmp_path / "out", run={"name": "v"}))
    assert train_main(["--config", str(cfg)]) == 2
    line = error_line(capsys.readouterr().err)
    assert "data.val_list: 1 of 24 validation image(s) cannot be read" in line
    assert f"{root}/val/005/00003.jpg (line 24 of {root}/val.txt)" in line and "data.on_error: skip" in line
    assert not (tmp_path / "out").exists()  # nothing created: no run directory, no checkpoint


def test_3_failing_evaluation_keeps_the_epochs_checkpoint_and_resume_evaluates_it(data_root, tmp_path):
    """A validation image whose header is fine but whose data cannot be decoded fails only at the
    evaluation. Before the change the evaluation ran before the epoch's checkpoint, so the
    epoch was lost; now the checkpoint is written first and a resume runs the evaluation."""
    root = list_dataset(data_root, tmp_path / "ds")
    bad = root / "val" / "002" / "00001.jpg"
    good = bad.read_bytes()
    data = bytearray(good)
    dht = data.index(b"\xff\xc4")  # the first Huffman table: a broken one passes the header check
    data[dht + 5:dht + 20] = b"\xff" * 15
    bad.write_bytes(bytes(data))
    cfg = write_config(tmp_path / "e.yaml", list_cfg(root, tmp_path, optim={"epochs": 1}, run={"name": "e"}))
    proc = fastlt("--config", cfg, check_rc=2)
    line = error_line(proc.stderr)
    assert f"cannot read validation image {bad} (line 10 of {root}/val.txt)" in line, line
    run = tmp_path / "e"
    assert (run / "checkpoints" / "latest").read_text() == "epoch0001_step000000"
    assert (run / "checkpoints" / "epoch0001_step000000" / "meta.json").is_file()
    bad.write_bytes(good)
    done = fastlt("--config", cfg, "--resume", "auto")
    assert "epoch 0/1" not in done.stdout and done.stdout.count("eval epoch 0:") == 1
    assert [h["epoch"] for h in json.loads((run / "metrics.json").read_text())["history"]] == [0]


# --------------------------------------------------------------------------------------
# 4: no code run from data files
# --------------------------------------------------------------------------------------


class _MarkerPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_4_a_crafted_cifar_batch_cannot_run_code(tmp_path, capsys):
    """Before the change pickle.load ran the payload of a crafted data_batch_1 (the marker file
    appeared) and only then reported "not a CIFAR python batch"."""
    from fastlt.cli import train_main
    from fastlt.data.cifar import cifar_lt
    from conftest import write_fake_cifar

    marker = tmp_path / "MARKER"
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps({b"data": _MarkerPayload(marker)}, protocol=2))
    cfg = tiny_config(tmp_path, tmp_path / "out", run={"name": "c"})
    cfg["data"].update(kind="cifar", cifar="cifar10", root=str(tmp_path / "cifar"), augment_recipe="cifar",
                       image_size=32, normalization="cifar", imb_factor=0.1)
    before = tree_digest(tmp_path / "cifar")
    assert train_main(["--config", str(write_config(tmp_path / "c.yaml", cfg))]) == 2
    line = error_line(capsys.readouterr().err)
    assert f"{folder}/data_batch_1: refused to load posix.system" in line and "nothing in it was run" in line
    assert not marker.exists()
    assert tree_digest(tmp_path / "cifar") == before and not (tmp_path / "out").exists()
    # The real format still loads through the same allowlist.
    assert len(cifar_lt(write_fake_cifar(tmp_path / "real"), "cifar10", 0.1)) > 0


# --------------------------------------------------------------------------------------
# 5-9: one line instead of a traceback
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "dali"])
@pytest.mark.parametrize("how", ["corrupt", "truncated", "empty", "missing"])
def test_5_bad_image_is_one_line(base_run, data_root, tmp_path, capfd, how, backend):
    """`fastlt eval` with a bad validation image and on_error: raise. Before the change the
    BadImageError escaped as a 40-100 line traceback on both backends (through the DataLoader
    worker's or the DALI reader's re-raise)."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    from fastlt.cli import main

    root = list_dataset(data_root, tmp_path / "ds")
    bad = root / "val" / "003" / "00002.jpg"
    cut(bad, how)
    cfg = write_config(tmp_path / "e.yaml", list_cfg(root, tmp_path, pipeline={"backend": backend, "num_workers": 1}))
    before = tree_digest(base_run["dir"])
    assert main(["eval", "--config", str(cfg), "--checkpoint", str(base_run["dir"] / "best.pt")]) == 2
    out = capfd.readouterr()
    line = error_line(out.err)
    assert f"validation image {bad} (line 15 of {root}/val.txt)" in line and "data.on_error: skip" in line, line
    assert "BytesIO" not in line
    assert tree_digest(base_run["dir"]) == before


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_5_bad_training_image_stops_the_run_with_one_line(base_run, data_root, tmp_path, backend):
    """A run resumed onto a dataset whose class-0 training images are truncated. Before the
    change the run died with a 90-110 line traceback ending in the BadImageError."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    root = list_dataset(data_root, tmp_path / "ds")
    for f in sorted((root / "train" / "000").glob("*.jpg")):
        cut(f, "truncated")
    run = tmp_path / "bad"
    shutil.copytree(base_run["dir"], run)
    cfg = list_cfg(root, tmp_path, optim={"epochs": 3}, pipeline={"backend": backend, "num_workers": 1},
                   run={"name": "bad"})
    before = tree_digest(run / "checkpoints")
    proc = fastlt("--config", write_config(tmp_path / "b.yaml", cfg), "--resume", "auto", check_rc=2)
    line = error_line(proc.stderr)
    assert re.search(rf"cannot (read|decode) image\(?s?\)? {root}/train/000/\d+\.jpg \(line \d+ of {root}/train.txt\)",
                     line), line
    assert "data.on_error: skip" in line
    assert tree_digest(run / "checkpoints") == before


def first_used_at(cfg: dict, epoch: int, step: int) -> int:
    """A training image (dataset index) that rank 0 of a one-process run of ``cfg`` reads for the
    first time at ``step`` of ``epoch`` (as background or foreground), never before."""
    import numpy as np

    from fastlt.config.loader import config_from_dict
    from fastlt.data.build import build_datasets
    from fastlt.pipelines.common import StreamPlan

    conf = config_from_dict(cfg)
    plan = StreamPlan(build_datasets(conf).train.labels, conf.data.batch_size, conf.run.seed, 0, 1,
                      conf.data.background_sampler, conf.data.foreground_sampler)
    b = conf.data.batch_size

    def read(e: int, steps: int) -> set[int]:
        return set(np.concatenate([idx[: steps * b] for idx in plan.epoch_indices(e)]).tolist())

    before = set().union(*(read(e, TINY_STEPS) for e in range(epoch))) | read(epoch, step)
    fresh = sorted(read(epoch, step + 1) - before)
    assert fresh, f"every image of epoch {epoch} step {step} was read before; pick another step"
    return fresh[0]


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_5_bad_training_image_keeps_the_steps_before_it(data_root, tmp_path, backend):
    """A training image first read at step 3 of epoch 1 is truncated. Before the change the run
    stopped with the right line, but the steps of epoch 1 before that image were lost (the
    last checkpoint was the start of the epoch). Now they are saved as a mid-epoch
    checkpoint that the message names, and once the file is repaired ``--resume auto`` ends
    with the weights of an uninterrupted run."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    from fastlt.config.loader import config_from_dict
    from fastlt.data.build import build_datasets
    from fastlt.files import safe_load

    root = list_dataset(data_root, tmp_path / "ds")
    sections = dict(pipeline={"backend": backend, "num_workers": 1})
    clean = list_cfg(root, tmp_path, run={"name": "clean"}, **sections)
    fastlt("--config", write_config(tmp_path / "clean.yaml", clean))

    cfg = list_cfg(root, tmp_path, run={"name": "bad"}, **sections)
    index = first_used_at(cfg, epoch=1, step=3)
    bad = Path(build_datasets(config_from_dict(cfg)).train.full_path(index))
    intact = bad.read_bytes()
    cut(bad, "truncated")
    path = write_config(tmp_path / "bad.yaml", cfg)
    line = error_line(fastlt("--config", path, check_rc=2).stderr)
    assert f"image(s) {bad}" in line or f"image {bad}" in line, line
    assert "data.on_error: skip" in line and "--resume auto continues from this batch" in line, line
    saved = re.search(r"everything trained so far is in checkpoint (\S+), and", line)
    assert saved, line
    ckpt = Path(saved.group(1))
    meta = json.loads((ckpt / "meta.json").read_text())
    # DALI reads a few batches ahead, so its error may come a step or two early; the torch
    # loader reads in step order.
    assert meta["epoch"] == 1 and (meta["step"] == 3 if backend == "torch" else 1 <= meta["step"] <= 3), meta
    assert (tmp_path / "bad" / "checkpoints" / "latest").read_text().strip() == ckpt.name
    state = [t for f in sorted(ckpt.glob("*.pt")) for t in tensors(safe_load(f)) if t.is_floating_point()]
    assert state and all(torch.isfinite(t).all() for t in state), ckpt

    bad.write_bytes(intact)
    done = fastlt("--config", path, "--resume", "auto")
    assert f"resumed from {ckpt}: epoch 1 step {meta['step']}" in done.stdout
    assert_same_weights(weights(tmp_path / "clean" / "last.pt"), weights(tmp_path / "bad" / "last.pt"))


def test_6_read_only_output_dir(base_run, read_only_dir, capsys):
    """Before the change: a PermissionError traceback from mkdir, after DeepSpeed had started."""
    from fastlt.cli import train_main

    cfg = dict(base_run["cfg"], run=dict(base_run["cfg"]["run"], output_dir=str(read_only_dir), name="r"))
    assert train_main(["--config", str(write_config(read_only_dir.parent / "r.yaml", cfg))]) == 2
    line = error_line(capsys.readouterr().err)
    assert f"run directory (run.output_dir / run.name) {read_only_dir}/r cannot be written: {read_only_dir} " \
           "does not accept new files" in line and "choose a writable folder" in line
    assert list(read_only_dir.iterdir()) == []


def test_6_a_file_where_the_run_folder_should_be(base_run, tmp_path, capsys):
    """Before the change: a FileExistsError traceback from mkdir, after DeepSpeed had started."""
    from fastlt.cli import train_main

    (tmp_path / "r").write_text("my notes")
    cfg = dict(base_run["cfg"], run=dict(base_run["cfg"]["run"], output_dir=str(tmp_path), name="r"))
    assert train_main(["--config", str(write_config(tmp_path / "r.yaml", cfg))]) == 2
    line = error_line(capsys.readouterr().err)
    assert f"run directory (run.output_dir / run.name) {tmp_path}/r is a file, not a folder" in line
    assert (tmp_path / "r").read_text() == "my notes"


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write instead of a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (2_500_000, 2_500_000))


def test_6_disk_full_during_a_checkpoint_write(base_run, tmp_path):
    """A file size limit below the checkpoint's size stands in for a disk that fills up: torch's
    writer fails the same way. Before the change: a traceback ending in "enforce fail at
    inline_container.cc ... unexpected pos", naming neither the path nor the cause."""
    run, cfg = copy_run(base_run, tmp_path, "full", optim={"epochs": 3})
    before = tree_digest(run / "checkpoints")
    proc = fastlt("--config", cfg, "--resume", "auto", check_rc=2, preexec_fn=_limit_file_size)
    line = error_line(proc.stderr)
    assert f"cannot write {run}/checkpoints/epoch0003_step000000.partial/" in line
    assert "this process may not write files over 2500000 bytes (ulimit -f)" in line and "MiB free" in line
    assert (f"the last complete checkpoint {run}/checkpoints/epoch0002_step000000 is untouched" in line
            and "continue with --resume auto" in line)
    assert tree_digest(run / "checkpoints") == before  # nothing half-written left, nothing lost


def test_7_batch_size_larger_than_the_dataset(base_run, capsys):
    """Did not reproduce against the code as found: the epoch-length check already ran before
    DeepSpeed and named data.batch_size (kept here so that it stays so)."""
    from fastlt.cli import train_main

    before = tree_digest(base_run["dir"])
    assert train_main(["--config", str(base_run["config"]), "--set", "data.batch_size=200", "run.name=b7"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "data.batch_size=200 leaves an epoch without a complete step: 123 training images" in line
    assert "lower data.batch_size" in line and tree_digest(base_run["dir"]) == before


def test_7_every_problem_against_the_dataset_in_one_message(base_run, capsys):
    """Before the change a wrong data.num_classes, a batch larger than an epoch and a misspelt
    backbone took three launches, one refusal each; now one message names all three."""
    from fastlt.cli import train_main

    before = tree_digest(base_run["dir"])
    missing = base_run["dir"].parent / "no-such-weights.pth"
    assert train_main(["--config", str(base_run["config"]), "--set", "data.batch_size=200", "data.num_classes=9",
                       "model.backbone=resnet19", f"model.pretrained={missing}", "run.name=b7all"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "4 problems in the config for this dataset and 1 rank(s): (1) model.backbone: 'resnet19'" in line, line
    assert f"(2) data.num_classes is 9, but the synthetic dataset (data.synthetic.num_classes) has {NUM_CLASSES}" in line
    assert "(3) data.batch_size=200 leaves an epoch without a complete step" in line
    assert f"(4) model.pretrained: {missing} does not exist" in line  # the file, though the model is not known yet
    assert tree_digest(base_run["dir"]) == before and not (base_run["dir"].parent / "b7all").exists()


def test_7_unknown_pipeline_extra_key(base_run, capsys):
    """Did not reproduce against the code as found: pipeline.extra keys were already checked
    when the config is loaded (kept here so that it stays so)."""
    from fastlt.cli import train_main

    assert train_main(["--config", str(base_run["config"]), "--set", "pipeline.extra={prefetch_factr: 4}"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "pipeline.extra has unknown key(s) 'prefetch_factr' (did you mean 'prefetch_factor'?)" in line


def test_7_batch_size_in_deepspeed_extra(base_run, tmp_path, capsys):
    """Before the change: DeepSpeed's bare AssertionError "Check batch related parameters.
    train_batch_size is not equal to ..." after a 40-line traceback."""
    from fastlt.cli import train_main

    assert train_main(["--config", str(base_run["config"]), "--set", "deepspeed.extra={train_batch_size: 64}",
                       f"run.output_dir={tmp_path}"]) == 2
    line = error_line(capsys.readouterr().err)
    assert ("deepspeed.extra.train_batch_size: fastlt sets this DeepSpeed setting from data.batch_size" in line
            and "set data.batch_size instead" in line)
    assert list(tmp_path.iterdir()) == []  # refused when the config is loaded: no run directory


def test_7_vit_at_an_image_size_its_patch_grid_does_not_fit(base_run, tmp_path, capsys):
    """Before the change: timm's "AssertionError: Input height (16) doesn't match model (224)"
    at the first step, after DeepSpeed had started."""
    from fastlt.cli import train_main

    args = ["--config", str(base_run["config"]), "--set", "model.backbone=vit_small_patch16_224",
            f"run.output_dir={tmp_path}"]
    assert train_main(args) == 2
    line = error_line(capsys.readouterr().err)
    assert "data.image_size: vit_small_patch16_224 is built for 224×224 inputs" in line
    assert "model.backbone_kwargs='{img_size: 16}'" in line
    assert train_main(args + ["data.image_size=40", "data.synthetic.image_size=40"]) == 2
    assert "must be a multiple of 16; got 40" in error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def _resume_fails(run: Path, cfg: Path, capsys) -> str:
    from fastlt.cli import train_main

    before = tree_digest(run)
    assert train_main(["--config", str(cfg), "--resume", "auto"]) == 2
    line = error_line(capsys.readouterr().err)
    assert tree_digest(run) == before
    return line


def test_8_resume_after_the_model_states_file_was_deleted(base_run, tmp_path, capsys):
    """Before the change: DeepSpeed's bare AssertionError after it had started."""
    run, cfg = copy_run(base_run, tmp_path, "nomodel")
    (run / "checkpoints" / "epoch0002_step000000" / "mp_rank_00_model_states.pt").unlink()
    line = _resume_fails(run, cfg, capsys)
    assert (f"checkpoint {run}/checkpoints/epoch0002_step000000 cannot be used: mp_rank_00_model_states.pt: "
            "the file is missing" in line)
    assert f"--resume {run}/checkpoints/epoch0001_step000000" in line


def test_8_resume_with_a_truncated_meta_json(base_run, tmp_path, capsys):
    """Before the change: a json.JSONDecodeError traceback."""
    run, cfg = copy_run(base_run, tmp_path, "nometa")
    meta = run / "checkpoints" / "epoch0002_step000000" / "meta.json"
    meta.write_text(meta.read_text()[:40])
    line = _resume_fails(run, cfg, capsys)
    assert f"{meta} is damaged (not valid JSON" in line
    assert f"--resume {run}/checkpoints/epoch0001_step000000" in line


def test_8_resume_with_a_truncated_checkpoint_file(base_run, tmp_path, capsys):
    """Before the change the message read like a security refusal ("cannot load ... safely ...
    fastlt only loads tensors") and named no checkpoint to fall back to."""
    run, cfg = copy_run(base_run, tmp_path, "cut")
    pt = run / "checkpoints" / "epoch0002_step000000" / "mp_rank_00_model_states.pt"
    pt.write_bytes(pt.read_bytes()[:100_000])
    line = _resume_fails(run, cfg, capsys)
    assert "mp_rank_00_model_states.pt: truncated or corrupt" in line and "safely" not in line
    assert f"resume from the previous complete checkpoint with --resume {run}/checkpoints/epoch0001_step000000" in line


def _kill_a_worker_while_training(cfg: Path, *, wait_for: str) -> tuple[subprocess.CompletedProcess, list[int]]:
    """Run training, SIGKILL one of its data-worker processes once ``wait_for`` is printed (again
    every few seconds while it keeps running); returns the result and the session's survivors."""
    proc = subprocess.Popen([sys.executable, "-m", "fastlt.train", "--config", str(cfg)], cwd=REPO, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for line in proc.stdout:
            if line.startswith(wait_for):
                break
        # Generous bounds (a machine running other CPU-heavy jobs): the trainer normally stops
        # within a second of the first kill; the 40-epoch run would take many minutes.
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            workers = psutil.Process(proc.pid).children()
            if workers:
                os.kill(workers[-1].pid, signal.SIGKILL)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    continue
            time.sleep(0.05)
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            raise AssertionError("the trainer still ran 420 s after its data workers were first killed: it hangs "
                                 "on the dead worker") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    survivors = [p.pid for p in psutil.process_iter() if _pgid(p.pid) == proc.pid]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), survivors


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_9_a_killed_data_worker(data_root, tmp_path, backend):
    """Before the change: torch's "DataLoader worker (pid N) is killed by signal: Killed."
    traceback; the DALI pipeline waited forever on its dead reader process."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    cfg = tiny_config(data_root, tmp_path, optim={"epochs": 40}, pipeline={"backend": backend, "num_workers": 2},
                      run={"name": "k", "log_every": 3})
    proc, survivors = _kill_a_worker_while_training(write_config(tmp_path / "k.yaml", cfg), wait_for="epoch 1/")
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = error_line(proc.stderr)
    assert re.search(r"a (data-loader worker|DALI reader) process \(pid \d+\) was killed by signal SIGKILL", line), line
    assert "lower pipeline.num_workers (now 2) or data.batch_size" in line
    latest = (tmp_path / "k" / "checkpoints" / "latest").read_text()
    assert f"The last checkpoint {tmp_path}/k/checkpoints/{latest} is complete: continue with --resume auto" in line
    assert not list((tmp_path / "k" / "checkpoints").glob("*.partial"))
    assert survivors == []  # no orphaned worker left behind


@pytest.mark.parametrize("backend,start", [("torch", None), ("dali", "fork"), ("dali", "spawn")])
def test_9_a_trainer_killed_by_sigkill_leaves_no_reader_process(data_root, tmp_path, backend, start):
    """SIGKILL of the trainer itself (``kill -9``, the out-of-memory killer). Before the change
    the DALI reader processes (training and validation) outlived it, asleep on their sockets
    until killed by hand. The torch loader's workers already exited: they watch their parent."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    extra = {"py_start_method": start} if start else {}
    cfg = tiny_config(data_root, tmp_path, optim={"epochs": 40}, run={"name": "k9"},
                      pipeline={"backend": backend, "num_workers": 1, "extra": extra})
    path = write_config(tmp_path / "k.yaml", cfg)
    proc = subprocess.Popen([sys.executable, "-m", "fastlt.train", "--config", str(path)], cwd=REPO, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)

    def group() -> list[psutil.Process]:  # the run's processes, but for exited ones not yet reaped
        found = []
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if _pgid(p.pid) == proc.pid and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
        return found

    try:
        for line in proc.stdout:
            if line.startswith("epoch 0/"):
                break
        # Generous bounds, so that a loaded machine only makes the test slower, never fail.
        deadline = time.monotonic() + 180
        while len(group()) < 2 and time.monotonic() < deadline:  # the trainer and its reader(s)
            time.sleep(0.1)
        readers = [p.pid for p in group() if p.pid != proc.pid]
        assert readers, "no reader process was started within 180 s of epoch 0's first line"
        proc.kill()
        proc.wait(timeout=60)
        deadline = time.monotonic() + 60  # torch's workers look at their parent every 5 s
        while group() and time.monotonic() < deadline:
            time.sleep(0.2)
        survivors = [p.pid for p in group()]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert survivors == [], f"reader processes {survivors} outlived the trainer by 60 s (readers were {readers})"


def test_9_eval_out_is_a_directory(base_run, tmp_path, capsys):
    """Before the change: an IsADirectoryError traceback after the whole evaluation, and a
    `.runs.tmp-*` file left next to the directory."""
    from fastlt.cli import main

    target = tmp_path / "runs"
    target.mkdir()
    before = tree_digest(tmp_path)
    args = ["eval", "--config", str(base_run["config"]), "--checkpoint", str(base_run["dir"] / "best.pt")]
    assert main(args + ["--out", str(target)]) == 2
    line = error_line(capsys.readouterr().err)
    assert f"--out {target} is a directory; give a file name, e.g. {target}/metrics.json" in line
    assert tree_digest(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_9_eval_out_in_a_read_only_folder(base_run, read_only_dir, capsys):
    """Before the change: a PermissionError traceback after the whole evaluation."""
    from fastlt.cli import main

    args = ["eval", "--config", str(base_run["config"]), "--checkpoint", str(base_run["dir"] / "best.pt")]
    assert main(args + ["--out", str(read_only_dir / "m.json")]) == 2
    line = error_line(capsys.readouterr().err)
    assert f"--out {read_only_dir}/m.json cannot be written: {read_only_dir} does not accept new files" in line
    assert list(read_only_dir.iterdir()) == []


# --------------------------------------------------------------------------------------
# 10-14: silently wrong
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_10_replaced_training_images_are_reported_every_epoch(data_root, tmp_path, backend):
    """Before the change the torch backend never reported replaced images (its warning sat after
    a loop the trainer never finishes) and neither backend put a count in log.jsonl."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    root = list_dataset(data_root, tmp_path / "ds")
    for f in sorted((root / "train" / "000").glob("*.jpg"))[::4]:  # 10 of the 40 class-0 images
        cut(f, "truncated")
    cfg = list_cfg(root, tmp_path, pipeline={"backend": backend, "num_workers": 1}, run={"name": "s", "log_every": 3})
    cfg["data"]["on_error"] = "skip"
    proc = fastlt("--config", write_config(tmp_path / "s.yaml", cfg))
    run = tmp_path / "s"
    reports = events(run, "skipped_images")
    assert [r["epoch"] for r in reports] == [0, 1]
    for r in reports:
        assert r["skipped_images"] > 0 and r["first"].startswith(f"{root}/train/000/")
        last = [t for t in events(run, "train") if t["epoch"] == r["epoch"]][-1]
        assert last["skipped_images"] == r["skipped_images"]
        assert (f"epoch {r['epoch']}: replaced {r['skipped_images']} unreadable training image(s) (rank 0) by images "
                f"of the same class (data.on_error: skip); first: {root}/train/000/") in proc.stdout


@pytest.mark.parametrize("value", ["optim.lr=.nan", "optim.lr=.inf", "method.scaling_factor=[.inf, 255]",
                                   "deepspeed.extra={gradient_predivide_factor: .nan}"])
def test_11_non_finite_numbers_are_rejected(base_run, tmp_path, capsys, value):
    """Before the change optim.lr=.nan (or any nan/inf) was accepted and trained on."""
    from fastlt.cli import train_main

    assert train_main(["--config", str(base_run["config"]), "--set", value, f"run.output_dir={tmp_path}"]) == 2
    line = error_line(capsys.readouterr().err)
    key = {"optim": "optim.lr", "method": "method.scaling_factor[0]", "deepspeed": "deepspeed.extra."
           "gradient_predivide_factor"}[value.split(".")[0]]
    assert re.search(rf"{re.escape(key)}: must be a finite number; got -?(nan|inf)", line), line
    assert list(tmp_path.iterdir()) == []


def test_11_a_section_given_twice(base_run, tmp_path, capsys):
    """Before the change PyYAML kept the second `optim:` section silently (lr back to its default)."""
    from fastlt.cli import train_main

    text = base_run["config"].read_text().replace(str(base_run["dir"].parent), str(tmp_path)) + "optim:\n  epochs: 3\n"
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    first = 1 + next(i for i, ln in enumerate(text.splitlines()) if ln.startswith("optim:"))
    assert train_main(["--config", str(path)]) == 2
    line = error_line(capsys.readouterr().err)
    assert (f"{path}: line {len(text.splitlines()) - 1}: key 'optim' is given twice in the same mapping (first on "
            f"line {first})") in line and "Merge the two into one" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["twice.yaml"]


def test_11_unknown_deepspeed_extra_key_is_named(data_root, tmp_path):
    """Before the change a misspelt section of deepspeed.extra went to DeepSpeed unchecked and
    had no effect, without a word."""
    cfg = tiny_config(data_root, tmp_path, optim={"epochs": 1}, deepspeed={"extra": {"zero_optimisation": {"stage": 1}}},
                      run={"name": "x", "max_steps_per_epoch": 1})
    proc = fastlt("--config", write_config(tmp_path / "x.yaml", cfg))
    warning = "warning: deepspeed.extra: DeepSpeed's config does not know 'zero_optimisation' (did you mean " \
              "'zero_optimization'?); it has no effect: fix or remove it"
    assert proc.stdout.count(warning) == 1
    assert [e["msg"] for e in events(tmp_path / "x", "warning")] == [warning]


def test_12_resume_without_the_rng_file_says_the_continuation_is_not_exact(base_run, tmp_path):
    """Before the change a checkpoint without its rng_rank00000.pt resumed silently, without
    restoring the random state."""
    run, cfg = copy_run(base_run, tmp_path, "norng")
    ckpt = run / "checkpoints" / "epoch0001_step000000"
    (ckpt / "rng_rank00000.pt").unlink()
    before = tree_digest(ckpt)
    proc = fastlt("--config", cfg, "--resume", ckpt)
    warning = (f"warning: checkpoint {ckpt} has no rng_rank00000.pt: the torch/numpy/python random generators are "
               "not restored, so this continuation is not bit-exact")
    assert proc.stdout.count(warning) == 1 and "Traceback" not in proc.stderr
    assert [e["msg"][:len(warning)] for e in events(run, "warning")] == [warning]
    assert tree_digest(ckpt) == before


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, data_root):
    """A run stopped by SIGTERM inside epoch 0, after its step 1: a mid-epoch checkpoint at step 2.
    The trainer waits after that step for the signal (FASTLT_TEST_PAUSE, test-only; the step then runs), so the
    stop point does not depend on how fast the machine runs the loop."""
    out = tmp_path_factory.mktemp("stopped")
    cfg = tiny_config(data_root, out, run={"name": "t", "log_every": 1})
    path = write_config(out / "t.yaml", cfg)
    proc = subprocess.Popen([sys.executable, "-m", "fastlt.train", "--config", str(path)], cwd=REPO,
                            env=child_env(FASTLT_TEST_PAUSE="step:0:1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("fastlt-test: paused at step:0:1"):
            proc.send_signal(signal.SIGTERM)
            break
    out_text, err = proc.communicate(timeout=600)
    return {"dir": out / "t", "config": path, "rc": proc.returncode, "stderr": err}


def test_14_sigterm_exits_143(stopped_run):
    """Before the change a run stopped by SIGTERM exited 130, the code of Ctrl-C."""
    assert stopped_run["rc"] == 143, stopped_run["stderr"][-3000:]
    lines = stopped_run["stderr"].strip().splitlines()
    assert "Traceback" not in stopped_run["stderr"] and "SIGTERM received" in lines[0]
    latest = (stopped_run["dir"] / "checkpoints" / "latest").read_text()
    assert latest == "epoch0000_step000002", latest
    assert lines[-1] == (f"fastlt: stopped by SIGTERM at epoch 0 step {int(latest[-6:])}; checkpoint "
                         f"{stopped_run['dir']}/checkpoints/{latest}. Continue with --resume auto")


def test_13_mid_epoch_resume_with_another_batch_size_is_refused(stopped_run, tmp_path, capsys):
    """Before the change the resume went ahead: the saved step index, counted in batches of 8,
    was applied to batches of 4, so the epoch went on from another sample position (repeating
    some images, skipping others) without a word."""
    from fastlt.cli import train_main

    run = tmp_path / "t"
    shutil.copytree(stopped_run["dir"], run)
    latest = (run / "checkpoints" / "latest").read_text()
    step = int(latest[-6:])
    tree = yaml.safe_load(stopped_run["config"].read_text())
    tree["run"]["output_dir"] = str(tmp_path)
    cfg = write_config(tmp_path / "t.yaml", tree)
    before = tree_digest(run)
    assert train_main(["--config", str(cfg), "--resume", "auto", "--set", "data.batch_size=4"]) == 2
    line = error_line(capsys.readouterr().err)
    assert (f"checkpoint {run}/checkpoints/{latest} stopped inside epoch 0 at step {step} of 6 steps of "
            "data.batch_size=8; this config has data.batch_size=4 (6 steps per epoch)") in line
    assert "Resume it with --set data.batch_size=8 (change it at the next epoch boundary)" in line
    assert tree_digest(run) == before


def test_14_resuming_a_finished_run_adds_no_history_and_writes_strict_json(base_run, tmp_path):
    """Before the change resuming a finished run appended a second entry for its last epoch to
    `history`, and metrics.json held bare NaN (the many-shot group is empty here), which is
    not JSON."""
    run, cfg = copy_run(base_run, tmp_path, "again")
    history = json.loads((run / "metrics.json").read_text())["history"]
    before = tree_digest(run / "checkpoints")
    per_class = (run / "per_class.csv").read_text()
    (run / "per_class.csv").unlink()
    done = fastlt("--config", cfg, "--resume", "auto")
    assert tree_digest(run / "checkpoints") == before
    # Its last evaluation finished after the last checkpoint: taken from the record, not run again
    # (before the change every such resume evaluated epoch 1 a second time).
    assert "eval epoch" not in done.stdout, done.stdout[-2000:]
    assert "the evaluation of epoch 1 already ran after checkpoint epoch0002_step000000" in done.stdout
    assert (run / "per_class.csv").read_text() == per_class  # the report again, from the recorded per-class result

    def no_constants(name):
        raise ValueError(f"{name} is not JSON")

    metrics = json.loads((run / "metrics.json").read_text(), parse_constant=no_constants)
    assert metrics["history"] == history and [h["epoch"] for h in history] == [0, 1]
    assert metrics["final"]["many"] is None


def test_14_first_ctrl_c_during_setup(data_root, tmp_path):
    """Before the change the first Ctrl-C during setup (before training starts) printed
    "aborted by a second Ctrl-C"."""
    cfg = write_config(tmp_path / "i.yaml", tiny_config(data_root, tmp_path, run={"name": "i"}))
    proc = subprocess.Popen([sys.executable, "-m", "fastlt.train", "--config", str(cfg)], cwd=REPO, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("synthetic dataset in"):  # printed before the model and the engine are built
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=600)  # generous: a hang, not a slow machine, expires it
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines() == ["fastlt: stopped by SIGINT during setup; nothing was trained in this launch "
                                        "and the run directory holds only complete files; start it again the same "
                                        "way (with --resume auto once it has a checkpoint)"], err[-3000:]
    assert not (tmp_path / "i" / "checkpoints").exists()
