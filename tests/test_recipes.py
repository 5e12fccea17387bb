"""The shipped recipes (fastlt.config.recipes): ``--config`` takes a recipe name, ``fastlt recipes``
lists them with their published top-1, and a wheel installed outside the source tree finds
them — ``fastlt recipes`` and a one-epoch ``fastlt demo`` run from there."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, child_env

from fastlt.errors import ConfigError
from fastlt.config.recipes import format_recipes, list_recipes, recipe_dir, resolve_config

# docs/design.md §2, the top-1 column.
PUBLISHED = {"imagenet_lt_resnext50_90ep": 59.76, "imagenet_lt_resnext50_180ep": 60.37,
             "imagenet_lt_resnet50_100ep": 58.49, "inat18_resnet50_100ep": 72.06, "cifar100_lt_if100": 53.16,
             "cifar100_lt_if50": 57.40, "cifar100_lt_if10": 64.53, "cifar10_lt_if100": 86.07,
             "cifar10_lt_if50": 88.00, "cifar10_lt_if10": 91.42, "cifar100_lt_if100_400ep": 55.06}


def test_recipes_carry_the_published_top1():
    recipes = {r.name: r for r in list_recipes()}
    assert sorted(recipes) == sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    assert {n: r.top1 for n, r in recipes.items() if r.top1 is not None} == PUBLISHED
    assert [n for n, r in recipes.items() if r.unconfirmed] == ["inat18_resnet50_100ep"]
    table = format_recipes()
    for name, top1 in PUBLISHED.items():
        assert any(line.startswith(name + " ") and f"{top1:6.2f}" in line for line in table.splitlines()), name
    assert "places_lt_resnet50" in table and "ImageNet-LT, ResNeXt-50 (32x4d), 90 epochs" in table


def test_config_takes_a_recipe_name_and_a_path_wins(tmp_path, monkeypatch):
    assert recipe_dir() == REPO / "configs"
    assert resolve_config("cifar100_lt_if100") == REPO / "configs" / "cifar100_lt_if100.yaml"
    assert resolve_config("demo.yaml") == REPO / "configs" / "demo.yaml"
    monkeypatch.chdir(tmp_path)
    # The README's commands name configs/<recipe>.yaml; outside the source tree that is the shipped recipe.
    assert resolve_config("configs/cifar10_lt_if50.yaml") == REPO / "configs" / "cifar10_lt_if50.yaml"
    own = tmp_path / "demo.yaml"
    own.write_text("data: {kind: synthetic, root: x}\n")
    assert resolve_config("demo.yaml") == Path("demo.yaml")  # an existing path wins over the recipe
    with pytest.raises(ConfigError, match=r"--config cifar100_lt_if1000: no such file, and no shipped recipe of "
                                          r"that name \(did you mean 'cifar100_lt_if100'\?\)"):
        resolve_config("cifar100_lt_if1000")
    with pytest.raises(ConfigError, match="no such file"):
        resolve_config(str(tmp_path / "elsewhere" / "demo.yaml"))


@pytest.fixture(scope="session")
def wheel_file(tmp_path_factory) -> Path:
    """The project built as a wheel, once per test session."""
    base = tmp_path_factory.mktemp("wheel")
    # Built from a copy of the sources, so no build/ folder of an earlier build (which setuptools
    # would reuse, stale files included) and nothing of this environment gets into the wheel.
    src = base / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "runs",
                                                             "data_cache", "__pycache__", ".pytest_cache",
                                                             ".benchmarks"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(base / "dist"), str(src)], check=True, capture_output=True, timeout=600, cwd=base)
    (wheel,) = (base / "dist").glob("fastlt-*.whl")
    return wheel


@pytest.fixture(scope="session")
def installed_wheel(wheel_file, tmp_path_factory):
    """The wheel installed (no dependencies: they are this environment's) into a folder outside
    the repository."""
    base, wheel = tmp_path_factory.mktemp("installed"), wheel_file
    target = base / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=600, cwd=base)
    work = base / "work"
    work.mkdir()
    env = child_env(PYTHONPATH=str(target))
    return target, work, env


def _run(installed, *args, timeout=600):
    target, work, env = installed
    return subprocess.run([sys.executable, str(target / "bin" / "fastlt"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=work, env=env)


def test_installed_wheel_lists_recipes_and_runs_the_demo(installed_wheel):
    target, work, env = installed_wheel
    where = subprocess.run([sys.executable, "-c", "import fastlt, fastlt.config.recipes as r; print(fastlt.__file__); "
                            "print(r.recipe_dir())"], capture_output=True, text=True, cwd=work, env=env, check=True)
    module, recipes = where.stdout.split()
    assert Path(module).is_relative_to(target) and Path(recipes) == target / "fastlt" / "configs"
    assert not Path(module).is_relative_to(REPO)

    proc = _run(installed_wheel, "recipes")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^imagenet_lt_resnext50_90ep +59\.76 ", proc.stdout, re.M), proc.stdout
    assert str(target / "fastlt" / "configs") in proc.stdout
    # What the installed fastlt cites and uses ships with it: the design document and the split lists.
    assert str(target / "fastlt" / "docs" / "design.md") in proc.stdout
    assert (target / "fastlt" / "data" / "splits" / "ImageNet_LT_val.txt.gz").is_file()

    proc = _run(installed_wheel, "demo", "--set", "optim.epochs=1", "optim.warmup_epochs=0",
                "run.max_steps_per_epoch=4", "pipeline.num_workers=0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # One epoch, all of it at or before method.l_d_warm: the banner says CutMix only, not ConCutMix.
    assert "fastlt demo: CutMix only (area labels throughout" in proc.stdout
    assert "on the synthetic long-tailed set (14 classes" in proc.stdout
    (run_dir,) = (work / "runs").glob("demo-*")
    assert (run_dir / "metrics.json").is_file() and (run_dir / "per_class_accuracy.png").is_file()
    assert (work / "data_cache" / "synthetic-demo-14").is_dir()  # relative to where the user runs it
    assert not os.path.exists(REPO / "runs" / run_dir.name)


def _site_without(dest: Path, skip) -> Path:
    """A folder of links to this environment's installed packages except those ``skip`` names
    (a top-level name, or ``nvidia/<name>`` inside the nvidia namespace folder)."""
    import sysconfig

    dest.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        if skip(entry.name):
            continue
        if entry.name == "nvidia" and entry.is_dir():  # a namespace of several wheels: DALI is one of them
            (dest / "nvidia").mkdir()
            for sub in entry.iterdir():
                if not skip(f"nvidia/{sub.name}"):
                    (dest / "nvidia" / sub.name).symlink_to(sub)
            continue
        (dest / entry.name).symlink_to(entry)
    return dest


def test_a_wheel_installed_without_dali_trains_the_demo_on_the_torch_backend(wheel_file, tmp_path):
    """`pip install fastlt` (no DALI extra) into a new virtual environment, used from outside the
    repository: the demo trains on the torch backend and says why. The environment's other
    packages (torch, DeepSpeed, timm: several GB) are linked in from this one, without DALI and
    without this checkout's editable fastlt."""
    def skip(name: str) -> bool:
        return (name.startswith(("fastlt", "__editable__", "nvidia_dali", "_virtualenv")) or name == "nvidia/dali"
                or name.endswith(".pth"))

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True,
                   timeout=300)
    (site,) = (venv / "lib").glob("python*/site-packages")
    (site / "dependencies.pth").write_text(f"{_site_without(tmp_path / 'deps', skip)}\n")
    python = venv / "bin" / "python"
    env = {k: v for k, v in child_env().items() if k not in ("PYTHONPATH", "FASTLT_PIPELINE")}
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel_file)],
                   check=True, capture_output=True, timeout=600, cwd=tmp_path, env=env)
    work = tmp_path / "work"
    work.mkdir()
    probe = subprocess.run([str(python), "-c", "import fastlt, importlib.util as u; print(fastlt.__file__); "
                            "print(u.find_spec('nvidia.dali'))"], capture_output=True, text=True, cwd=work, env=env,
                           check=True)
    module, dali = probe.stdout.split()
    assert Path(module).is_relative_to(site) and dali == "None", probe.stdout

    proc = subprocess.run([str(venv / "bin" / "fastlt"), "demo", "--set", "optim.epochs=1", "optim.warmup_epochs=0",
                           "run.max_steps_per_epoch=2", "pipeline.num_workers=0"], capture_output=True, text=True,
                          timeout=900, cwd=work, env=env)  # ~15 CPU-seconds; the margin is for a shared machine
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "data pipeline: torch (auto: nvidia.dali does not import (ModuleNotFoundError" in out, out[-3000:]
    assert "fastlt[dali-cuda12]" in out
    (run_dir,) = (work / "runs").glob("demo-*")
    assert json.loads((run_dir / "metrics.json").read_text())["evaluated_epochs"] == [0]
