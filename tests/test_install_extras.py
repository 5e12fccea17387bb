"""The install without DALI: DALI is an extra per CUDA major version (setup.py), and a machine
without ``nvidia.dali`` trains on the torch backend and says why."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import fastlt.pipelines as pipelines

SETUP_PY = Path(__file__).resolve().parents[1] / "setup.py"


def _setup_kwargs() -> dict:
    """The literal keyword arguments of setup.py's setup(...) call, read without running it."""
    tree = ast.parse(SETUP_PY.read_text(encoding="utf-8"))
    call = next(n for n in ast.walk(tree)
                if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup")
    out = {}
    for kw in call.keywords:
        try:
            out[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:  # not a literal (long_description reads README.md)
            pass
    return out


def test_core_install_has_no_dali_and_the_extras_follow_cuda_majors():
    kw = _setup_kwargs()
    assert not [r for r in kw["install_requires"] if "dali" in r.lower()]
    extras = kw["extras_require"]
    assert [r.split(">")[0] for r in extras["dali-cuda12"]] == ["nvidia-dali-cuda120"]
    assert [r.split(">")[0] for r in extras["dali-cuda13"]] == ["nvidia-dali-cuda130"]
    assert not [r for r in extras["test"] if "dali" in r.lower()]  # the Makefile adds the DALI extra


def test_auto_without_dali_picks_torch_and_says_why(monkeypatch):
    # None in sys.modules makes `import nvidia.dali` raise ImportError, as on a machine without it.
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    monkeypatch.delenv("FASTLT_PIPELINE", raising=False)
    assert pipelines.dali_available()[0] is False
    chosen, why = pipelines.choose_backend("auto")
    assert chosen == "torch"
    assert why.startswith("auto: nvidia.dali does not import (ModuleNotFoundError")
    assert "fastlt[dali-cuda12]" in why and "fastlt[dali-cuda13]" in why
    assert pipelines.select_backend("auto") == "torch"
    with pytest.raises(RuntimeError, match=r"'dali' was requested \(config\).*fastlt\[dali-cuda12\]"):
        pipelines.choose_backend("dali")


def test_explicit_choices_give_their_source(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    monkeypatch.setenv("FASTLT_PIPELINE", "torch")
    assert pipelines.choose_backend("auto") == ("torch", "requested by environment FASTLT_PIPELINE")
    assert pipelines.choose_backend("torch") == ("torch", "requested by config")
