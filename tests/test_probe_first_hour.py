"""Odd inputs a new user meets in the first hour (a probe of the ``fastlt config`` / ``--epochs`` /
``--deepspeed_config`` / ``fastlt export`` / ``fastlt data`` / timm-name / floor-check features):
each refused in one clear line, or handled, instead of a traceback, a misleading message or a
silently ignored setting. No training: configs, small models and files only."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_cli_in_process as _run
from fastlt.cli import _train_parser
from fastlt.commands import load_args_config as _load
from fastlt.config.loader import config_to_dict, load_config, rescale_epochs
from fastlt.config.recipes import resolve_config
from fastlt.errors import CheckpointError, ConfigError, DataError
from fastlt.training.engine import DeepSpeedSection

REPO = Path(__file__).resolve().parents[1]


# -- --epochs ---------------------------------------------------------------------------

def test_epochs_rescaling_is_exact_for_any_count_and_reports_defaults_as_values():
    tree = {"optim": {"epochs": 24, "warmup_epochs": 2}, "method": {"l_d_warm": 15}, "run": {"eval_every": 8}}
    changed = rescale_epochs(tree, 10**20)
    # integer arithmetic: 2 * 10**20 / 24 rounds half-up to ...333 (a float ratio gave ...2992)
    assert tree["optim"]["warmup_epochs"] == 8333333333333333333
    assert tree["run"]["checkpoint_every"] == 4166666666666666667  # 10**20 / 24, half up
    # run.checkpoint_every was left at its default (1): the note names that value, not None
    assert "run.checkpoint_every: 1 -> 4166666666666666667" in changed
    assert not any("None" in c for c in changed)
    short = {"optim": {"epochs": 24}}
    assert not any(c.startswith("run.checkpoint_every") for c in rescale_epochs(short, 3))  # 1 -> 1: no change


def test_epochs_1_on_a_step_schedule_says_why_instead_of_a_milestone_error():
    with pytest.raises(ConfigError, match=r"--epochs 1: the recipe's step schedule .* use --epochs 2 or more"):
        load_config(resolve_config("cifar100_lt_if100"), epochs=1)
    cfg = load_config(resolve_config("cifar100_lt_if100"), epochs=2)  # the shortest step run: one milestone
    assert cfg.optim.milestones == [1] and cfg.optim.epochs == 2


def test_every_bad_override_and_bad_value_is_named_in_one_message():
    with pytest.raises(ConfigError) as e:
        load_config(resolve_config("demo"), ["optim.lrr=0.1", "data.batchsize=3", "optim.lr=-1"])
    msg = str(e.value)
    assert msg.startswith("3 problems in the config: ")
    assert "'optim.lrr'; did you mean 'optim.lr'?" in msg and "'data.batchsize'" in msg
    assert "optim.lr: must be > 0; got -1.0" in msg


def test_config_with_a_world_size_that_does_not_divide_the_batch_prints_only_the_error(capsys):
    rc, out, err = _run(capsys, "config", "--config", "imagenet_lt_resnext50_90ep", "--world-size", "3")
    assert rc == 2 and out == ""
    assert "data.batch_size (256) must be divisible by the number of ranks (3)" in err


# -- DeepSpeed's own config -------------------------------------------------------------

@pytest.mark.parametrize("section, fastlt_key", [
    ({"bf16": {"enabled": True}}, "deepspeed.precision"),
    ({"fp16": {"enabled": True, "loss_scale": 0}}, "deepspeed.precision"),
    ({"torch_autocast": {"enabled": True}}, "deepspeed.precision"),
    ({"optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}, "optim.lr"),
    ({"scheduler": {"type": "WarmupLR"}}, "optim.schedule"),
], ids=["bf16", "fp16", "torch_autocast", "optimizer", "scheduler"])
def test_deepspeed_sections_fastlt_owns_are_refused_by_name(section, fastlt_key):
    # bf16/fp16 put the weights in low precision behind fastlt's back (the first convolution then
    # fails on fp32 images); an optimizer/scheduler would be ignored in favour of fastlt's SGD.
    key = next(iter(section))
    with pytest.raises(ConfigError, match=rf"deepspeed.extra.{key}: fastlt sets this DeepSpeed setting from "
                                          rf".*{fastlt_key}"):
        DeepSpeedSection(extra=section)


def test_a_disabled_precision_section_is_accepted_and_clipping_is_not_called_a_batch_setting():
    assert DeepSpeedSection(extra={"fp16": {"enabled": False}}).extra == {"fp16": {"enabled": False}}
    with pytest.raises(ConfigError) as e:
        DeepSpeedSection(extra={"gradient_clipping": 1.0})
    assert "deepspeed.grad_clip" in str(e.value) and "global batch" not in str(e.value)


def test_deepspeed_config_file_that_is_missing_says_so(tmp_path):
    args = _train_parser().parse_args(["--config", "demo", "--deepspeed_config", str(tmp_path / "nope.json")])
    with pytest.raises(ConfigError, match=r"--deepspeed_config .*nope.json: no such file"):
        _load(args)
    (tmp_path / "bf16.json").write_text('{"bf16": {"enabled": true}}', encoding="utf-8")
    args = _train_parser().parse_args(["--config", "demo", "--deepspeed_config", str(tmp_path / "bf16.json")])
    with pytest.raises(ConfigError, match="deepspeed.extra.bf16"):
        _load(args)


# -- timm names with tags ---------------------------------------------------------------

def test_a_timm_name_with_an_unknown_tag_is_refused_with_its_tags():
    pytest.importorskip("timm")
    from fastlt.models.bcl import check_backbone

    check_backbone("resnet18.a1_in1k")  # a real tag: accepted (timm builds the same architecture)
    with pytest.raises(ConfigError, match=r"'resnet18.a1_in1kk': timm has no tag 'a1_in1kk' for resnet18; "
                                          r"did you mean resnet18.a1_in1k"):
        check_backbone("resnet18.a1_in1kk")
    with pytest.raises(ConfigError, match=r"timm has no tag 'not_a_weight_file_xyz' for resnet18; its tags: "
                                          r"resnet18\."):
        check_backbone("resnet18.not_a_weight_file_xyz")  # nothing close: the first tags are listed


# -- fastlt export ----------------------------------------------------------------------

def test_export_of_a_vit_run_reads_img_size_from_the_run_config(tmp_path, capsys):
    timm = pytest.importorskip("timm")
    from safetensors.torch import load_file

    from fastlt.models import BCLModel
    from fastlt.training.checkpoint import save_weights

    torch.manual_seed(0)
    run = tmp_path / "vit"
    run.mkdir()
    cfg = load_config(resolve_config("demo"), ["model.backbone=vit_tiny_patch16_224", "data.image_size=32",
                                               "model.backbone_kwargs={img_size: 32}"])
    (run / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)), encoding="utf-8")
    model = BCLModel("vit_tiny_patch16_224", num_classes=3, feat_dim=8, img_size=32)
    save_weights(run / "best.pt", model, {"signature": {"backbone": "vit_tiny_patch16_224", "use_norm": True}})
    rc, out, err = _run(capsys, "export", "--checkpoint", run / "best.pt")
    assert rc == 0, err
    assert f"model.backbone_kwargs from {run / 'config.yaml'}" in out
    info = json.loads((run / "export" / "export.json").read_text())
    assert info["kwargs"] == {"img_size": 32}
    net = timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32)
    net.load_state_dict(load_file(str(run / "export" / "model.safetensors")), strict=True)


def test_checkpoint_arguments_of_other_kinds_get_messages_about_what_they_are(tmp_path):
    from fastlt.training.checkpoint import load_weights
    from fastlt.training.evaluate import checkpoint_run_dir

    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError) as e:
        load_weights(tmp_path / "empty")
    assert "neither a checkpoint" in str(e.value) and "--resume" not in str(e.value)  # export/eval have no --resume
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(CheckpointError, match="is not a regular file"):
        load_weights(tmp_path / "fifo")
    # checkpoints/latest (DeepSpeed's pointer file) stands for the checkpoint it names, not damaged weights
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "epoch0001_step000000").mkdir(parents=True)
    (ckpts / "latest").write_text("epoch0001_step000000", encoding="utf-8")
    assert checkpoint_run_dir(ckpts / "latest") == tmp_path / "run"
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):  # the pointer was followed
        load_weights(ckpts / "latest")


# -- fastlt data ------------------------------------------------------------------------

def test_data_names_the_source_of_a_published_list_that_is_not_shipped(tmp_path, monkeypatch):
    from fastlt.reports.dataset_report import load_target

    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"ImageNet_LT_train.txt: no such file here; .* published ImageNet-LT "
                                        r"train list .*classifier-balancing"):
        load_target("ImageNet_LT_train.txt")
    with pytest.raises(DataError) as e:
        load_target("nosuch_list.txt")
    assert "no such file, and no shipped recipe" in str(e.value) and "--config" not in str(e.value)
    assert "Pass an image folder, a list file, a YAML path" in str(e.value)
    with pytest.raises(DataError, match="this published list ships with fastlt"):  # the .gz file name works too
        load_target("Places_LT_val.txt.gz")
    with pytest.raises(DataError, match=r"--root .*nowhere is not a folder"):
        load_target("ImageNet_LT_val.txt", root=str(tmp_path / "nowhere"))


# -- bench/check_floors.py --------------------------------------------------------------

@pytest.mark.parametrize("text", ["garbage", "[]", '{"benchmarks": [{"name": "x"}]}'],
                         ids=["not-json", "a-list", "no-stats"])
def test_check_floors_refuses_a_results_file_that_is_not_benchmark_output(tmp_path, text):
    (tmp_path / "r.json").write_text(text, encoding="utf-8")
    p = subprocess.run([sys.executable, str(REPO / "bench" / "check_floors.py"), "--device", "cpu",
                        str(tmp_path / "r.json")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "is not pytest-benchmark --benchmark-json output" in p.stderr


def test_the_epochs_note_says_when_a_set_value_wins_over_the_rescaled_one():
    notes: list[str] = []
    cfg = load_config(resolve_config("demo"), ["method.l_d_warm=24"], epochs=1, notes=notes)
    assert cfg.method.l_d_warm == 24
    recipe = load_config(resolve_config("demo"))  # the recipe's own values
    assert f"method.l_d_warm: {recipe.method.l_d_warm} -> 0 (--set wins: 24)" in notes
    assert f"optim.warmup_epochs: {recipe.optim.warmup_epochs} -> 0" in notes  # not overridden: as before


def test_config_piped_into_a_reader_that_stops_early_ends_without_a_traceback():
    # `fastlt config ... | head -1`: the reader has gone when fastlt writes. Deterministically: the
    # pipe's read end is closed before the child starts, so its first write fails with EPIPE.
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([sys.executable, "-m", "fastlt.cli", "config", "--config", "demo"], stdout=w,
                           stderr=subprocess.PIPE, text=True, timeout=120, cwd=REPO)
    finally:
        os.close(w)
    assert p.returncode == 141 and "Traceback" not in p.stderr and "BrokenPipeError" not in p.stderr, p.stderr


def test_a_published_list_saved_with_crlf_line_endings_is_still_recognised(tmp_path):
    import gzip

    from fastlt.data.published import identify, shipped_list

    text = gzip.decompress(shipped_list("ImageNet_LT_val.txt").read_bytes())
    (tmp_path / "ImageNet_LT_val.txt").write_bytes(text.replace(b"\n", b"\r\n"))
    entry, line = identify(tmp_path / "ImageNet_LT_val.txt")
    assert entry is not None and entry.file == "ImageNet_LT_val.txt" and "CRLF" in line and "verified" in line
    (tmp_path / "ImageNet_LT_val.txt").write_bytes(text.replace(b"\n", b"\r\n", 1)[:-200])  # really different
    entry, line = identify(tmp_path / "ImageNet_LT_val.txt")
    assert entry is None and "not the published split" in line


def test_a_recipe_that_is_not_utf8_or_a_run_folder_is_refused_in_one_line(tmp_path):
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfeoptim:\n")
    with pytest.raises(ConfigError, match=r"bin.yaml: line 1 is not UTF-8 \(invalid start byte at byte 0\)"):
        load_config(resolve_config(str(tmp_path / "bin.yaml")))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("optim:\n  lr: 0.1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"a folder, not a recipe file; pass a YAML file; .*config.yaml is the "
                                          r"config of this run"):
        resolve_config(str(tmp_path / "run"))
