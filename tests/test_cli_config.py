"""Seeing and shortening a run: ``fastlt --version``, ``fastlt config`` (the resolved YAML and the
DeepSpeed JSON a run would use), ``--epochs N`` (a recipe rescaled, every epoch-based key keeping
its share), every config problem in one message, DeepSpeed's ``--deepspeed_config``, and the
shot-group thresholds as config keys (an empty group shows as '—')."""
from __future__ import annotations

import json
import math

import pytest
import yaml

from fastlt import __version__
from conftest import run_cli_in_process as _run
from fastlt.cli import _train_parser
from fastlt.commands import load_args_config as _load
from fastlt.config.loader import config_to_dict, load_config, rescale_epochs
from fastlt.config.recipes import resolve_config
from fastlt.errors import ConfigError


def test_version(capsys):
    rc, out, _ = _run(capsys, "--version")
    assert rc == 0 and out.strip() == f"fastlt {__version__}"


def test_config_prints_the_resolved_yaml_and_the_deepspeed_json(capsys):
    rc, out, err = _run(capsys, "config", "--config", "cifar100_lt_if100", "--set", "optim.lr=0.05",
                        "--world-size", "4")
    assert rc == 0, err
    yaml_part, json_part = out.split("# DeepSpeed config for 4 rank(s)")
    resolved = yaml.safe_load(yaml_part)
    expected = config_to_dict(load_config(resolve_config("cifar100_lt_if100"), ["optim.lr=0.05"]))
    assert resolved == expected and resolved["optim"]["lr"] == 0.05
    ds = json.loads(json_part.split("\n", 1)[1])
    batch = resolved["data"]["batch_size"]  # 256 in the published CIFAR recipe
    assert ds["train_micro_batch_size_per_gpu"] == batch // 4 and ds["train_batch_size"] == batch
    assert ds["timers"]["throughput"]["enabled"] is False


def test_config_refuses_a_world_size_below_one(capsys):
    rc, _, err = _run(capsys, "config", "--config", "demo", "--world-size", "0")
    assert rc == 2 and err.strip() == "fastlt: error: --world-size: must be >= 1; got 0"


def test_epochs_rescales_every_epoch_based_key():
    # The published CIFAR-100-LT recipe: 200 epochs, warm-up 5, milestones 160/180, l_d_warm 100,
    # eval every 10, checkpoint every 5. At 20 epochs (a tenth) each keeps its share, rounded half up:
    # warm-up 0.5 -> 1, milestones 16/18, area labels for 101/10 -> 10 epochs (l_d_warm 9), eval 1, ckpt 1.
    from fastlt.config.loader import read_recipe

    tree = read_recipe(resolve_config("cifar100_lt_if100"))
    assert (tree["optim"]["epochs"], tree["optim"]["warmup_epochs"], tree["optim"]["milestones"],
            tree["method"]["l_d_warm"]) == (200, 5, [160, 180], 100)
    changed = rescale_epochs(tree, 20)
    assert tree["optim"] == {**tree["optim"], "epochs": 20, "warmup_epochs": 1, "milestones": [16, 18]}
    assert tree["method"]["l_d_warm"] == 9
    assert tree["run"]["eval_every"] == 1 and tree["run"]["checkpoint_every"] == 1
    assert "optim.milestones: [160, 180] -> [16, 18]" in changed and "method.l_d_warm: 100 -> 9" in changed


def test_epochs_makes_a_two_epoch_run_of_any_recipe_valid():
    # Without --epochs, --set optim.epochs=2 breaks the warm-up and the milestones (both named below).
    with pytest.raises(ConfigError) as e:
        load_config(resolve_config("cifar100_lt_if100"), ["optim.epochs=2"])
    assert str(e.value).startswith("2 problems in the config: (1) optim.warmup_epochs (5) must be < optim.epochs (2)")
    assert "(2) optim.milestones: [160, 180] reaches past optim.epochs (2)" in str(e.value)
    notes = []
    cfg = load_config(resolve_config("cifar100_lt_if100"), [], epochs=2, notes=notes)
    assert (cfg.optim.epochs, cfg.optim.warmup_epochs, cfg.optim.milestones, cfg.method.l_d_warm) == (2, 0, [1], 0)
    assert notes[0] == "optim.epochs: 200 -> 2"
    # an override still wins over the rescaled value
    cfg = load_config(resolve_config("cifar100_lt_if100"), ["method.l_d_warm=-1"], epochs=2)
    assert cfg.method.l_d_warm == -1


def test_epochs_must_be_positive(capsys):
    rc, _, err = _run(capsys, "config", "--config", "demo", "--epochs", "0")
    assert rc == 2 and err.strip() == "fastlt: error: --epochs: must be a whole number >= 1; got 0"


def test_every_section_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(resolve_config("demo"), ["data.batch_size=0", "method.topk=-3", "optim.lr=-1"])
    msg = str(e.value)
    assert msg.startswith("3 problems in the config: (1) data.batch_size")
    assert "(2) method.topk" in msg and "(3) optim.lr" in msg


def test_deepspeed_config_file_merges_into_extra_and_owned_keys_are_refused(tmp_path):
    ok, owned = tmp_path / "ok.json", tmp_path / "owned.json"
    ok.write_text(json.dumps({"gradient_predivide_factor": 2.0}))
    owned.write_text(json.dumps({"train_batch_size": 8}))
    args = _train_parser().parse_args(["--config", "demo", "--deepspeed", "--deepspeed_config", str(ok)])
    assert _load(args).deepspeed.extra["gradient_predivide_factor"] == 2.0
    with pytest.raises(ConfigError, match="deepspeed.extra.train_batch_size: fastlt sets this DeepSpeed setting"):
        _load(_train_parser().parse_args(["--config", "demo", "--deepspeed_config", str(owned)]))
    with pytest.raises(ConfigError, match="not a regular file"):
        _load(_train_parser().parse_args(["--config", "demo", "--deepspeed_config", str(tmp_path)]))
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        _load(_train_parser().parse_args(["--config", "demo", "--deepspeed_config", str(tmp_path / "bad.json")]))


def test_shot_thresholds_are_config_keys_and_an_empty_group_shows_a_dash():
    from fastlt.reports.logger import format_metrics
    from fastlt.reports.metrics import shot_accuracy

    # 3 classes with 50, 12 and 3 training images; all predictions right except one of class 2.
    preds, labels, counts = [0, 1, 2, 0], [0, 1, 2, 2], [50, 12, 3]
    conv = shot_accuracy(preds, labels, counts)  # convention: many > 100 (none), medium 20-100, few < 20
    assert math.isnan(conv["many"]) and conv["medium"] == 100.0 and conv["few"] == pytest.approx(75.0)
    assert format_metrics(conv) == "overall 75.00 | many — | medium 100.00 | few 75.00"
    small = shot_accuracy(preds, labels, counts, many=10, few=5)  # many: 50, 12; few: 3
    assert small["many"] == 100.0 and math.isnan(small["medium"]) and small["few"] == 50.0
    assert small["shot_thresholds"] == {"many": 10, "few": 5}
    cfg = load_config(resolve_config("demo"), ["run.many_shot=10", "run.few_shot=5"])
    assert (cfg.run.many_shot, cfg.run.few_shot) == (10, 5)
    with pytest.raises(ConfigError, match=r"run.few_shot \(50\) must not exceed run.many_shot \+ 1 \(11\)"):
        load_config(resolve_config("demo"), ["run.many_shot=10", "run.few_shot=50"])
