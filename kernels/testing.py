"""Helpers for testing fastlt's Triton kernels against their references (ARCHITECTURE §3).

On a machine with CUDA the parity tests run the compiled kernels on the GPU. On a CPU
machine they run in Triton's interpreter, which must be switched on with
``TRITON_INTERPRET=1`` *before triton is first imported in the process* (triton fixes the
mode of ``tl.sum``, ``tl.max``, ... at import time). A test module calls
:func:`prepare_interpreter` before anything else; if another module of the same pytest
session imported triton first (torchvision and timm do), the in-process cases cannot run
and :func:`run_module_in_fresh_interpreter` re-runs the module in a new Python process with
the variable set from the start. Exactly one of the two paths runs.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

__all__ = ["describe_mismatch", "in_child_process", "kernel_device", "prepare_interpreter",
           "run_module_in_fresh_interpreter", "skip_reason_in_process"]

_CHILD_FLAG = "FASTLT_KERNEL_TESTS_CHILD"


def in_child_process() -> bool:
    """True inside :func:`run_module_in_fresh_interpreter` (which must never recurse)."""
    return os.environ.get(_CHILD_FLAG) == "1"


def kernel_device() -> str:
    """"cuda" when a GPU is visible (compiled kernels), else "cpu" (interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def prepare_interpreter() -> None:
    """Switch the interpreter on for CPU runs, if triton has not been imported yet.

    The variable stays set for the rest of the process: triton reads it again lazily (e.g.
    when it first imports its gluon modules), and they must agree with its standard library.
    """
    if kernel_device() == "cpu" and "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"


def skip_reason_in_process() -> str | None:
    """Why the Triton kernels cannot run in this process (None if they can)."""
    from .dispatch import interpreter_active, triton_import_error

    why = triton_import_error()
    if why is not None:
        return f"triton does not import ({why})"
    if kernel_device() == "cuda":
        if interpreter_active():
            return "TRITON_INTERPRET=1 with a GPU visible: run the GPU parity tests without it"
        return None
    if not interpreter_active():
        return ("triton was imported before TRITON_INTERPRET=1 could be set (another test module imported it); "
                "the module re-runs in a fresh interpreter process instead (test_in_fresh_interpreter_process)")
    return None


def run_module_in_fresh_interpreter(path: str | Path, timeout: float = 600.0) -> subprocess.CompletedProcess:
    """``pytest <path>`` in a new process with TRITON_INTERPRET=1 from the start."""
    env = dict(os.environ, TRITON_INTERPRET="1", **{_CHILD_FLAG: "1"})
    env.pop("FASTLT_KERNELS", None)
    path = Path(path).resolve()
    root = path.parent.parent
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path)], cwd=root,
                          env=env, capture_output=True, text=True, timeout=timeout)


def describe_mismatch(got: torch.Tensor, want: torch.Tensor, *, atol: float, rtol: float, what: str = "",
                      show: int = 6) -> str | None:
    """None if ``got`` ≈ ``want`` (elementwise ``isclose``); else the count and first indices of mismatches."""
    if got.shape != want.shape:
        return f"{what}: shape {tuple(got.shape)} != expected {tuple(want.shape)}"
    g = got.detach().double().cpu()
    w = want.detach().double().cpu()
    bad = ~torch.isclose(g, w, atol=atol, rtol=rtol, equal_nan=True)
    if not bool(bad.any()):
        return None
    idx = torch.nonzero(bad)[:show]
    pairs = ", ".join(f"{tuple(i.tolist())}: got {g[tuple(i)].item():.8g} want {w[tuple(i)].item():.8g}"
                      for i in idx)
    return (f"{what}: {int(bad.sum())} of {bad.numel()} elements differ (atol={atol}, rtol={rtol}); "
            f"max abs diff {float((g - w).abs().nan_to_num(float('inf')).max()):.3g}; first: {pairs}")
