"""Config loading (fastlt.config.loader), the recipe files of configs/ against docs/design.md §2, and the
pieces of the trainer that are pure functions of the config (DeepSpeed dict, LR schedule)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from fastlt.config.loader import Config, ConfigError, config_to_dict, flat_keys, load_config, save_config

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"

# docs/design.md §2, transcribed independently of the YAML files:
# file: (backbone, epochs, lr, batch, accum, wd, tau, l_d_warm, (a, b), K, use_norm, D, temp, alpha, beta,
#        schedule, warmup, milestones)
IMAGENET = dict(use_norm=True, D=1024, temp=0.07, alpha=1.0, beta=0.35, schedule="cos", warmup=0, milestones=[],
                lr=0.1, batch=256, accum=1, wd=5e-4, tau=0.99, sf=(200, 255), K=30)
CIFAR = dict(backbone="resnet32", use_norm=False, D=128, temp=0.1, alpha=2.0, beta=0.6, schedule="step", lr=0.15,
             batch=256, accum=1, wd=5e-4)
RECIPES = {
    "imagenet_lt_resnext50_90ep.yaml": dict(IMAGENET, backbone="resnext50_32x4d", epochs=90, l_d_warm=60, C=1000),
    "imagenet_lt_resnext50_180ep.yaml": dict(IMAGENET, backbone="resnext50_32x4d", epochs=180, l_d_warm=120, C=1000),
    "imagenet_lt_resnet50_100ep.yaml": dict(IMAGENET, backbone="resnet50", epochs=100, l_d_warm=70, C=1000),
    "inat18_resnet50_100ep.yaml": dict(IMAGENET, backbone="resnet50", epochs=100, l_d_warm=80, C=8142, lr=0.2,
                                       batch=128, accum=2, wd=1e-4, sf=(1628, 255)),
    "cifar100_lt_if100.yaml": dict(CIFAR, epochs=200, tau=0.9, l_d_warm=100, sf=(20, 255), K=30, warmup=5,
                                   milestones=[160, 180], C=100, imb=0.01),
    "cifar100_lt_if50.yaml": dict(CIFAR, epochs=200, tau=0.75, l_d_warm=100, sf=(20, 255), K=30, warmup=5,
                                  milestones=[160, 180], C=100, imb=0.02),
    "cifar100_lt_if10.yaml": dict(CIFAR, epochs=200, tau=1.0, l_d_warm=100, sf=(20, 255), K=30, warmup=5,
                                  milestones=[160, 180], C=100, imb=0.1),
    "cifar10_lt_if100.yaml": dict(CIFAR, epochs=200, tau=0.85, l_d_warm=100, sf=(2, 255), K=3, warmup=5,
                                  milestones=[160, 180], C=10, imb=0.01),
    "cifar10_lt_if50.yaml": dict(CIFAR, epochs=200, tau=0.81, l_d_warm=100, sf=(2, 255), K=3, warmup=5,
                                 milestones=[160, 180], C=10, imb=0.02),
    "cifar10_lt_if10.yaml": dict(CIFAR, epochs=200, tau=1.0, l_d_warm=100, sf=(2, 255), K=3, warmup=5,
                                 milestones=[160, 180], C=10, imb=0.1),
    "cifar100_lt_if100_400ep.yaml": dict(CIFAR, epochs=400, tau=0.79, l_d_warm=160, sf=(20, 255), K=30, warmup=10,
                                         milestones=[360, 380], C=100, imb=0.01),
}
EXTRA_RECIPES = {  # not in the table; checked for dataset and architecture only
    "places_lt_resnet50.yaml": dict(backbone="resnet50", C=365),
    "imagenet_lt_vit_b16.yaml": dict(backbone="vit_base_patch16_224", C=1000),
    "demo.yaml": dict(backbone="resnet32", C=None),
}
ALL_FILES = sorted(list(RECIPES) + list(EXTRA_RECIPES))


def test_configs_folder_holds_exactly_the_recipes():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == ALL_FILES


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_matches_architecture_table(name):
    want = RECIPES[name]
    cfg = load_config(CONFIGS / name)
    assert cfg.model.backbone == want["backbone"]
    assert cfg.model.use_norm is want["use_norm"]
    assert cfg.model.feat_dim == want["D"]
    assert cfg.optim.epochs == want["epochs"]
    assert cfg.optim.lr == pytest.approx(want["lr"])
    assert cfg.optim.momentum == pytest.approx(0.9)
    assert cfg.optim.weight_decay == pytest.approx(want["wd"])
    assert cfg.optim.schedule == want["schedule"]
    assert cfg.optim.warmup_epochs == want["warmup"]
    assert cfg.optim.milestones == want["milestones"]
    assert cfg.data.batch_size == want["batch"]
    assert cfg.deepspeed.grad_accum_steps == want["accum"]
    m = cfg.method
    assert (m.alpha, m.beta, m.tau) == pytest.approx((want["alpha"], want["beta"], want["tau"]))
    assert m.l_d_warm == want["l_d_warm"]
    assert m.scaling_factor == pytest.approx(list(want["sf"]))
    assert m.omega == pytest.approx(want["sf"][0] / want["sf"][1])
    assert m.topk == want["K"]
    assert m.temperature == pytest.approx(want["temp"])
    assert m.label_normalize == "l1" and m.cutmix_prob == 0.5 and m.cutmix_per_sample is False
    assert cfg.num_classes == want["C"]
    if "imb" in want:
        assert cfg.data.kind == "cifar" and cfg.data.imb_factor == pytest.approx(want["imb"])
        assert cfg.data.imb_type == "exp" and cfg.data.augment_recipe == "cifar" and cfg.data.image_size == 32
        assert cfg.data.normalization == "cifar"
    else:
        assert cfg.data.kind == "list" and cfg.data.image_size == 224 and cfg.data.randaugment
        assert cfg.data.normalization == ("inat" if name.startswith("inat") else "imagenet")


@pytest.mark.parametrize("name", ALL_FILES)
def test_every_recipe_builds_its_model(name):
    from fastlt.models import build_model

    cfg = load_config(CONFIGS / name)
    num_classes = cfg.num_classes
    # Meta tensors: the architecture is built (shapes, heads) without allocating ResNeXt/ViT weights.
    with torch.device("meta"):
        model = build_model(cfg, num_classes)
    assert model.num_classes == num_classes
    assert model.feat_dim == cfg.model.feat_dim
    if name in EXTRA_RECIPES:
        assert cfg.model.backbone == EXTRA_RECIPES[name]["backbone"]
        if EXTRA_RECIPES[name]["C"] is not None:
            assert num_classes == EXTRA_RECIPES[name]["C"]
    head_out = [m for m in model.head.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert head_out.out_features == cfg.model.feat_dim
    if cfg.model.use_norm:
        assert tuple(model.fc.weight.shape)[1] == num_classes  # NormedLinear stores (in, C)
    else:
        assert model.fc.out_features == num_classes


def test_demo_recipe_is_concutmix_on_cached_synthetic_data():
    cfg = load_config(CONFIGS / "demo.yaml")
    assert cfg.data.kind == "synthetic"
    assert cfg.data.root.startswith("data_cache/")  # the git-ignored cache folder
    assert 0 <= cfg.method.l_d_warm < cfg.optim.epochs - 1  # the switch to ConCutMix labels happens


# --------------------------------------------------------------------------------------
# Overrides, unknown keys and wrong types
# --------------------------------------------------------------------------------------


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


SYNTH = "data: {kind: synthetic, root: /tmp/x}\n"


def test_overrides_are_parsed_as_yaml_and_typed(tmp_path):
    cfg = load_config(_write(tmp_path, SYNTH), ["optim.lr=0.05", "optim.schedule=step", "optim.milestones=[3, 5]",
                                                "optim.epochs=8", "method.scaling_factor=[2, 255]",
                                                "model.hidden_dim=null", "model.backbone=vit_small_patch16_224",
                                                "model.backbone_kwargs={img_size: 64}", "data.image_size=64",
                                                "deepspeed.grad_clip=1"])
    assert cfg.optim.lr == 0.05 and cfg.optim.milestones == [3, 5] and cfg.optim.epochs == 8
    assert cfg.method.omega == pytest.approx(2 / 255)
    assert cfg.model.hidden_dim is None and cfg.model.backbone_kwargs == {"img_size": 64}
    assert isinstance(cfg.deepspeed.grad_clip, float) and cfg.deepspeed.grad_clip == 1.0
    assert cfg.run.name == "c"  # defaults to the config file's stem


@pytest.mark.parametrize("override, key, suggestion", [
    ("method.l_d_wram=3", "method.l_d_wram", "method.l_d_warm"),
    ("optim.l_d_warm=3", "optim.l_d_warm", "method.l_d_warm"),  # right name, wrong section
    ("optim.lrr=0.1", "optim.lrr", "optim.lr"),
    ("modle.backbone=resnet32", "modle", "model"),
])
def test_unknown_override_names_key_and_closest(tmp_path, override, key, suggestion):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, SYNTH), [override])
    msg = str(e.value)
    assert repr(key) in msg and repr(suggestion) in msg


def test_unknown_key_in_yaml_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"'method\.topK'.*'method\.topk'"):
        load_config(_write(tmp_path, SYNTH + "method: {topK: 3}\n"))


@pytest.mark.parametrize("override, fragment", [
    ("optim.epochs=1.5", "optim.epochs: expected int, got 1.5"),
    ("optim.lr=fast", "optim.lr: expected float, got 'fast'"),
    ("model.use_norm=1", "model.use_norm: expected bool, got 1"),
    ("optim.milestones=[1, x]", "optim.milestones[1]: expected int"),
    ("method.scaling_factor=3", "method.scaling_factor: expected list[float]"),
    ("data=3", "data: expected a mapping"),
])
def test_wrong_types_name_the_key(tmp_path, override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, SYNTH), [override])
    assert fragment in str(e.value)


@pytest.mark.parametrize("override, fragment", [
    ("model.backbone=../resnet32", "expected resnet32 or a timm model name"),
    ("method.scaling_factor=[1, 0]", "method.scaling_factor"),
    ("method.l_d_warm=-2", "method.l_d_warm"),
    ("method.cutmix_prob=1.5", "method.cutmix_prob"),
    ("optim.warmup_epochs=300", "optim.warmup_epochs"),
    ("deepspeed.zero_stage=3", "deepspeed.zero_stage"),
    ("deepspeed.precision=fp8", "deepspeed.precision"),
    ("data.kind=list", "data.train_list: required"),
    ("data.augment_recipe=cifar", "data.image_size"),
    ("run.keep_last=0", "run.keep_last"),
])
def test_invalid_values_are_rejected_with_the_key(tmp_path, override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, SYNTH), [override])
    assert fragment in str(e.value)


@pytest.mark.parametrize("overrides, flat", [([], False), (["deepspeed.precision=bf16"], False),
                                             (["deepspeed.zero_stage=1"], True),
                                             (["deepspeed.precision=bf16", "deepspeed.autocast=false"], True)])
def test_channels_last_with_any_engine_mode(tmp_path, overrides, flat):
    """channels-last inputs work with every engine mode; only the weights of DeepSpeed's flat
    buffers (ZeRO, bf16/fp16 mode) stay NCHW (the e2e bf16 + ZeRO-2 run in test_train uses it)."""
    from fastlt.training.engine import flat_parameters
    from fastlt.pipelines import train_spec

    cfg = load_config(_write(tmp_path, SYNTH), ["model.channels_last=true", *overrides])
    assert flat_parameters(cfg.deepspeed) is flat
    spec = train_spec(cfg, None, batch_size=4)
    assert spec.memory_format == "channels_last"
    assert spec.dtype == ("bfloat16" if "deepspeed.autocast=false" in overrides else "float32")


def test_step_schedule_milestone_past_the_end_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="optim.milestones"):
        load_config(_write(tmp_path, SYNTH), ["optim.schedule=step", "optim.epochs=10", "optim.milestones=[5, 10]"])


@pytest.mark.parametrize("bad", ["optim.lr", "=3", "optim..lr=3", "optim.lr.x=3", "method.topk=[1"])
def test_malformed_overrides(tmp_path, bad):
    with pytest.raises(ConfigError):
        load_config(_write(tmp_path, SYNTH), [bad])


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(CONFIGS / "inat18_resnet50_100ep.yaml", ["run.seed=7", "model.backbone_kwargs={a: 1}"])
    out = tmp_path / "config.yaml"
    save_config(cfg, out)
    again = load_config(out)
    assert config_to_dict(again) == config_to_dict(cfg)
    assert yaml.safe_load(out.read_text())["method"]["scaling_factor"] == [1628.0, 255.0]


def _sections(cls=Config):
    import dataclasses
    import typing

    yield cls
    for tp in typing.get_type_hints(cls).values():
        if dataclasses.is_dataclass(tp):
            yield from _sections(tp)


def test_every_field_has_a_docstring():
    """House style: a docstring under each field of every section, wherever the section is declared."""
    import ast
    import inspect
    import textwrap

    missing = []
    for cls in _sections():
        (node,) = ast.parse(textwrap.dedent(inspect.getsource(cls))).body
        for i, stmt in enumerate(node.body):
            if isinstance(stmt, ast.AnnAssign):
                nxt = node.body[i + 1] if i + 1 < len(node.body) else None
                if not (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                        and isinstance(nxt.value.value, str)):
                    missing.append(f"{cls.__name__}.{stmt.target.id}")
    assert not missing, f"fields without a docstring: {missing}"
    assert "optim.lr" in flat_keys() and "data.synthetic.n_max" in flat_keys()


def test_loading_a_config_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, fastlt.config.loader as c; c.load_config('configs/imagenet_lt_resnext50_90ep.yaml'); "
            "print(sorted(m for m in ('torch', 'deepspeed', 'nvidia.dali', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# --------------------------------------------------------------------------------------
# Recipes composed from base files
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_FILES)
def test_recipe_resolves_to_its_frozen_values(name):
    """Every recipe resolves to exactly what it held before the recipes were composed from bases
    (tests/data/recipes_resolved.json was written from the stand-alone files)."""
    import json

    frozen = json.loads((Path(__file__).parent / "data" / "recipes_resolved.json").read_text())[name]
    got = config_to_dict(load_config(CONFIGS / name))

    def same(old: dict, new: dict, prefix=""):  # keys added to the config since then are not compared
        for k, v in old.items():
            if isinstance(v, dict) and k not in ("extra", "backbone_kwargs"):
                same(v, new[k], f"{prefix}{k}.")
            else:
                assert new[k] == v, f"{name}: {prefix}{k} is {new[k]!r}, was {v!r}"

    same(frozen, got)


def test_cifar_recipes_are_composed_from_one_base():
    bases = {p.name: yaml.safe_load(p.read_text()).get("base") for p in CONFIGS.glob("cifar*.yaml")}
    assert bases.pop("cifar100_lt_if100.yaml") is None
    assert set(bases.values()) == {"cifar100_lt_if100.yaml"}


def test_base_merges_sections_key_by_key(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "root.yaml").write_text(SYNTH + "optim: {lr: 0.3, epochs: 9}\nmethod: {topk: 7}\n")
    (tmp_path / "sub" / "mid.yaml").write_text("base: ../root.yaml\noptim: {lr: 0.2}\n")
    (tmp_path / "leaf.yaml").write_text("base: sub/mid.yaml\nmethod: {topk: 5}\n")
    cfg = load_config(tmp_path / "leaf.yaml", ["optim.epochs=4"])
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.method.topk) == (0.2, 4, 5)
    assert cfg.data.kind == "synthetic" and cfg.run.name == "leaf"  # the named file's stem, not a base's
    save_config(cfg, tmp_path / "resolved.yaml")
    assert "base" not in yaml.safe_load((tmp_path / "resolved.yaml").read_text())
    assert config_to_dict(load_config(tmp_path / "resolved.yaml")) == config_to_dict(cfg)


def test_base_cycles_and_bad_bases_are_rejected(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"comes back to a file already in it \(a.yaml -> b.yaml -> a.yaml\)"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"c.yaml: 'base: missing.yaml' names .*missing.yaml, which does not exist"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: [x]\n")
    with pytest.raises(ConfigError, match="must name a recipe file"):
        load_config(tmp_path / "d.yaml")
    with pytest.raises(ConfigError, match="'base' is a key of recipe files"):
        load_config(_write(tmp_path, SYNTH), ["base=x.yaml"])


# --------------------------------------------------------------------------------------
# DeepSpeed config and LR schedule
# --------------------------------------------------------------------------------------


def _cfg(tmp_path, *overrides) -> Config:
    return load_config(_write(tmp_path, SYNTH), list(overrides))


def test_deepspeed_config_from_ours(tmp_path):
    from fastlt.training.engine import deepspeed_config

    cfg = _cfg(tmp_path, "data.batch_size=128", "deepspeed.grad_accum_steps=2", "deepspeed.zero_stage=1",
               "deepspeed.grad_clip=5", "deepspeed.precision=bf16", "deepspeed.autocast=false")
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 32
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 32 * 2 * 4
    assert ds["zero_optimization"]["stage"] == 1 and ds["gradient_clipping"] == 5.0
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds and "torch_autocast" not in ds
    assert ds["data_types"] == {"buffer_dtype": "bf16"}  # BatchNorm statistics follow the weights
    assert "optimizer" not in ds  # the client SGD is used, never a DeepSpeed (JIT-built) fused optimizer

    auto = deepspeed_config(_cfg(tmp_path, "deepspeed.precision=fp16"), 1)
    assert auto["torch_autocast"] == {"enabled": True, "dtype": "float16"} and "fp16" not in auto
    fp16 = deepspeed_config(_cfg(tmp_path, "deepspeed.precision=fp16", "deepspeed.autocast=false",
                                 "deepspeed.loss_scale_power=12"), 1)
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["initial_scale_power"] == 12
    fp32 = deepspeed_config(_cfg(tmp_path), 1)
    assert not any(k in fp32 for k in ("bf16", "fp16", "torch_autocast"))
    extra = deepspeed_config(_cfg(tmp_path, "deepspeed.extra={zero_optimization: {overlap_comm: true}}"), 1)
    assert extra["zero_optimization"] == {"stage": 0, "overlap_comm": True}

    with pytest.raises(ConfigError, match="divisible by the number of ranks"):
        deepspeed_config(_cfg(tmp_path, "data.batch_size=10"), world_size=4)


def test_zero_gradient_bucket_is_the_models_size_unless_the_user_sets_it(tmp_path):
    """DeepSpeed's 5e8-element bucket, re-allocated every micro-step, is cut to the model's
    parameter count under ZeRO (one bucket either way); stage 0 has no bucket; extra wins."""
    from fastlt.training.engine import DEEPSPEED_REDUCE_BUCKET, deepspeed_config

    zero1 = _cfg(tmp_path, "deepspeed.zero_stage=1")
    assert deepspeed_config(zero1, 1, num_params=469_238)["zero_optimization"] == {
        "stage": 1, "reduce_bucket_size": 469_238}
    assert deepspeed_config(zero1, 1, num_params=10**10)["zero_optimization"]["reduce_bucket_size"] == \
        DEEPSPEED_REDUCE_BUCKET
    assert "reduce_bucket_size" not in deepspeed_config(zero1, 1)["zero_optimization"]  # no model: DeepSpeed's
    assert deepspeed_config(_cfg(tmp_path), 1, num_params=469_238)["zero_optimization"] == {"stage": 0}
    user = _cfg(tmp_path, "deepspeed.zero_stage=2", "deepspeed.extra={zero_optimization: {reduce_bucket_size: 1000}}")
    assert deepspeed_config(user, 1, num_params=469_238)["zero_optimization"]["reduce_bucket_size"] == 1000


def test_epoch_lr_cosine_with_warmup(tmp_path):
    from fastlt.training.schedule import EpochLR

    cfg = _cfg(tmp_path, "optim.lr=0.2", "optim.epochs=10", "optim.warmup_epochs=2", "optim.schedule=cos")
    lr = EpochLR(cfg.optim)
    # BCL's adjust_learning_rate, written out: warm-up (e+1)/W, then ½(1+cos(π(e−W+1)/(E−W+1))).
    expected = [0.2 * 1 / 2, 0.2 * 2 / 2] + [0.2 * 0.5 * (1 + math.cos(math.pi * (e - 1) / 9)) for e in range(2, 10)]
    got = [lr.lr_at(e) for e in range(10)]
    assert got == pytest.approx(expected)
    # The schedule's own output: the peak at the end of warm-up, then never rising, never 0.
    assert got[1] == max(got) and got[9] > 0 and all(a >= b for a, b in zip(got[1:], got[2:]))

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert lr.apply(opt, 3) == pytest.approx(expected[3]) and opt.param_groups[0]["lr"] == pytest.approx(expected[3])
    assert lr.state_dict()["last_epoch"] == 3


def test_epoch_lr_step_schedule(tmp_path):
    from fastlt.training.schedule import EpochLR

    cfg = _cfg(tmp_path, "optim.lr=0.15", "optim.epochs=200", "optim.warmup_epochs=5", "optim.schedule=step",
               "optim.milestones=[160, 180]")
    lr = EpochLR(cfg.optim)
    assert lr.lr_at(0) == pytest.approx(0.03) and lr.lr_at(4) == pytest.approx(0.15)
    assert lr.lr_at(159) == pytest.approx(0.15)
    assert lr.lr_at(160) == pytest.approx(0.015) and lr.lr_at(179) == pytest.approx(0.015)
    assert lr.lr_at(180) == pytest.approx(0.0015) and lr.lr_at(199) == pytest.approx(0.0015)
