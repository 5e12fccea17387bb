"""Kernel backend selection, fastlt.kernels.dispatch (docs/design.md §3, "Kernel contract").

Triton for CUDA tensors when triton imports, PyTorch otherwise; FASTLT_KERNELS=torch|triton
overrides; an explicit request that cannot be met raises, never falls back. The decision
depends only on the device type, so the CUDA cases run here without a GPU. Cases that need
a process whose triton state is known (never imported, or not importable at all) run in a
fresh Python subprocess.
"""
import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastlt.kernels import dispatch
from fastlt.kernels.dispatch import select_backend
from fastlt.method.labels import rectify_labels, reference_rectify_labels
from fastlt.method.losses import reference_soft_cross_entropy, soft_cross_entropy
from spec_formulas import dense_rectify_labels, spec_soft_cross_entropy

NO_TRITON = "ImportError: No module named 'triton'"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv("FASTLT_KERNELS", raising=False)
    dispatch._reset_for_tests()
    yield
    dispatch._reset_for_tests()


def test_auto_picks_torch_for_cpu_tensors():
    assert select_backend(torch.device("cpu")) == "torch"
    assert select_backend("cpu") == "torch"


def test_auto_picks_triton_for_cuda_tensors_when_triton_imports(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_import_error", lambda: None)
    assert select_backend("cuda") == "triton"
    assert select_backend(torch.device("cuda", 0)) == "triton"


def test_auto_falls_back_to_torch_without_triton(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_import_error", lambda: NO_TRITON)
    assert select_backend("cuda") == "torch"


@pytest.mark.parametrize("value", ["torch", " Torch ", "TORCH"])
def test_env_torch_overrides_cuda(monkeypatch, value):
    monkeypatch.setattr(dispatch, "triton_import_error", lambda: None)
    monkeypatch.setenv("FASTLT_KERNELS", value)
    assert select_backend("cuda") == "torch"
    assert select_backend("cpu") == "torch"


def test_env_triton_without_triton_is_an_error(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_import_error", lambda: NO_TRITON)
    monkeypatch.setenv("FASTLT_KERNELS", "triton")
    with pytest.raises(RuntimeError, match=r"FASTLT_KERNELS=triton but triton cannot be imported \(ImportError"):
        select_backend("cuda")


def test_env_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_import_error", lambda: None)
    monkeypatch.setattr(dispatch, "interpreter_active", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("FASTLT_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="need CUDA tensors.*start Python with TRITON_INTERPRET=1"):
        select_backend("cpu")
    # Not cached: it raises again, and never falls back to torch.
    with pytest.raises(RuntimeError):
        select_backend("cpu")


def test_env_triton_on_cpu_with_interpreter_set_too_late_says_so(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_import_error", lambda: None)
    monkeypatch.setattr(dispatch, "interpreter_active", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FASTLT_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="triton was imported before it was"):
        select_backend("cpu")


def test_env_triton_on_cpu_runs_in_the_interpreter(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_import_error", lambda: None)
    monkeypatch.setattr(dispatch, "interpreter_active", lambda: True)
    monkeypatch.setenv("FASTLT_KERNELS", "triton")
    assert select_backend("cpu") == "triton"


def test_unknown_value_is_an_error(monkeypatch):
    monkeypatch.setenv("FASTLT_KERNELS", "cuda")
    with pytest.raises(ValueError, match=r"FASTLT_KERNELS='cuda' is not a kernel backend; allowed: auto, torch, "
                                         r"triton"):
        select_backend("cpu")


def test_decision_is_made_and_logged_once(monkeypatch, caplog):
    calls = []
    real = dispatch._decide
    monkeypatch.setattr(dispatch, "_decide", lambda *a: calls.append(a) or real(*a))
    with caplog.at_level(logging.INFO, logger="fastlt.kernels"):
        for _ in range(3):
            assert select_backend("cpu") == "torch"
    assert calls == [("cpu", "auto")]
    records = [r for r in caplog.records if r.name == "fastlt.kernels"]
    assert len(records) == 1 and "torch backend for cpu tensors" in records[0].getMessage()


def test_cpu_results_are_the_reference_by_default():
    """Users without a GPU get exactly the PyTorch reference (not merely something close)."""
    g = torch.Generator().manual_seed(0)
    z, centers = torch.randn(5, 8, generator=g), torch.randn(12, 8, generator=g)
    a, b = torch.randint(0, 12, (5,), generator=g), torch.randint(0, 12, (5,), generator=g)
    lam, counts = torch.rand(5, generator=g), torch.randint(1, 50, (12,), generator=g)
    kw = dict(topk=3, omega=0.5)
    label = rectify_labels(z, centers, a, b, lam, counts, **kw)
    assert torch.equal(label, reference_rectify_labels(z, centers, a, b, lam, counts, **kw))
    logits, target = torch.randn(5, 12, generator=g), torch.softmax(torch.randn(5, 12, generator=g), 1)
    loss = soft_cross_entropy(logits, target)
    assert torch.equal(loss, reference_soft_cross_entropy(logits, target))
    # And the independent spec (tests/spec_formulas.py). The label: the B×C×D difference rounds
    # each fp32 similarity differently from the norm expansion (a few 1e-7 relative); these rows'
    # K-th and (K+1)-th similarities are 3.3e-3 apart (relative), so both keep the same classes.
    # Measured (2026-12-03): max |Δ| 1.9e-9, max relative 1.3e-7; bound 50x / 16x that.
    spec_label = dense_rectify_labels(z, centers, a, b, lam, counts, **kw)
    assert torch.equal(label == 0, spec_label == 0), "kept classes differ from the spec's"
    torch.testing.assert_close(label, spec_label, atol=1e-7, rtol=2e-6)
    # The soft CE against the spec's fp64 log-sum-exp: fp32 rounding of a 12-term sum and a log,
    # measured |Δ| 8.5e-8 (relative 3.0e-8); bound 1e-6 relative, 33x that.
    torch.testing.assert_close(loss.double(), spec_soft_cross_entropy(logits, target), atol=0, rtol=1e-6)


def _script(*parts: str) -> str:
    return "\n".join(textwrap.dedent(p) for p in parts)


def _run_fresh(script: str, **env) -> dict:
    full_env = {k: v for k, v in os.environ.items() if k not in ("FASTLT_KERNELS", "TRITON_INTERPRET")}
    full_env.update(env)
    proc = subprocess.run([sys.executable, "-c", script], env=full_env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


_CALL_BOTH = """
    def attempt(fn):
        try:
            fn()
            return "ok"
        except RuntimeError as exc:
            return "RuntimeError: " + str(exc)

    z, c = torch.randn(3, 4), torch.randn(5, 4)
    lab, lam, counts = torch.tensor([0, 1, 2]), torch.full((3,), 0.5), torch.tensor([3, 4, 5, 6, 7])
    rect = attempt(lambda: fastlt.method.labels.rectify_labels(z, c, lab, lab, lam, counts, topk=2, omega=1.0))
    ce = attempt(lambda: fastlt.method.losses.soft_cross_entropy(torch.randn(3, 5), torch.full((3, 5), 0.2)))
"""


def test_explicit_triton_on_cpu_without_interpreter_is_an_error_in_a_fresh_process():
    """No mocks: a real process, FASTLT_KERNELS=triton, CPU tensors, no TRITON_INTERPRET."""
    out = _run_fresh(_script("""
        import json, sys
        import torch
        import fastlt, fastlt.kernels, fastlt.method.labels, fastlt.method.losses
        imported_triton = "triton" in sys.modules
    """, _CALL_BOTH, """
        print(json.dumps(dict(imported_triton=imported_triton, rect=rect, ce=ce)))
    """), FASTLT_KERNELS="triton")
    assert out["imported_triton"] is False, "importing fastlt must not import triton"
    for key in ("rect", "ce"):
        assert out[key].startswith("RuntimeError: FASTLT_KERNELS=triton with cpu tensors: the Triton kernels need "
                                   "CUDA tensors"), out[key]


def test_users_without_triton_can_import_and_run_fastlt():
    """triton made unimportable: fastlt imports, CPU runs on torch, explicit triton raises."""
    script = _script("""
        import json, sys
        sys.modules["triton"] = None  # what Python does for a module that is not there: import fails
        import os
        import torch
        import fastlt, fastlt.kernels, fastlt.method.labels, fastlt.method.losses
        from fastlt.kernels import dispatch
    """, _CALL_BOTH, """
        auto = dict(rect=rect, ce=ce, cuda=dispatch.select_backend("cuda"))
        os.environ["FASTLT_KERNELS"] = "triton"
    """, _CALL_BOTH, """
        print(json.dumps(dict(auto=auto, explicit=dict(rect=rect, ce=ce))))
    """)
    out = _run_fresh(script)
    assert out["auto"] == {"rect": "ok", "ce": "ok", "cuda": "torch"}
    for key in ("rect", "ce"):
        assert "FASTLT_KERNELS=triton but triton cannot be imported" in out["explicit"][key], out["explicit"][key]
