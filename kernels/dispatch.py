"""The one place where fastlt chooses between its Triton kernels and the PyTorch references.

docs/design.md §3 ("Kernel contract", "Decide backends once"):

* ``FASTLT_KERNELS`` unset (or ``auto``): Triton for CUDA tensors when ``triton`` imports,
  the PyTorch reference otherwise (CPU tensors, or no triton installed);
* ``FASTLT_KERNELS=torch``: always the PyTorch reference;
* ``FASTLT_KERNELS=triton``: always Triton. CUDA tensors run the compiled kernels; CPU
  tensors run them in Triton's interpreter, which needs ``TRITON_INTERPRET=1`` in the
  environment *before triton is first imported* (triton decorates its own standard library
  — ``tl.max``, ``tl.sum``, ... — in the mode it sees at import time). A request that cannot
  be met raises ``RuntimeError`` saying why; it never falls back silently.

The decision is made once per (device type, requested backend), cached and logged once.
Nothing here imports triton unless a Triton decision has to be checked, so users without
triton can ``import fastlt``.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os

import torch

__all__ = ["BACKENDS", "ENV_VAR", "interpreter_active", "select_backend", "triton_import_error"]

ENV_VAR = "FASTLT_KERNELS"
BACKENDS = ("torch", "triton")
_REQUESTS = ("auto",) + BACKENDS

logger = logging.getLogger("fastlt.kernels")


@functools.lru_cache(maxsize=None)
def _import_triton() -> str | None:
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return f"{type(exc).__name__}: {exc}"
    return None


def triton_import_error() -> str | None:
    """None when ``import triton`` works, else the reason it does not (tried once)."""
    return _import_triton()


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "on", "yes")


def interpreter_active() -> bool:
    """Whether triton runs in interpreter mode in this process.

    Triton fixes the mode of its standard library when ``triton.language`` is first imported,
    so this asks triton itself (importing it now if nothing has yet, which fixes the mode
    from the current ``TRITON_INTERPRET``) rather than reading the environment variable.
    """
    if triton_import_error() is not None:
        return False
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.standard.sum, InterpretedFunction)


def _cpu_triton_error(device_type: str) -> str:
    if _env_flag("TRITON_INTERPRET"):
        return (f"{ENV_VAR}=triton with {device_type} tensors: TRITON_INTERPRET=1 is set, but triton was "
                "imported before it was, so triton runs compiled (CUDA-only) kernels in this process. "
                "Set TRITON_INTERPRET=1 in the environment before starting Python, or use CUDA tensors, "
                f"or set {ENV_VAR}=torch.")
    return (f"{ENV_VAR}=triton with {device_type} tensors: the Triton kernels need CUDA tensors. To run them "
            "on the CPU in Triton's interpreter (slow; for testing) start Python with TRITON_INTERPRET=1; "
            f"otherwise unset {ENV_VAR} or set it to torch.")


def _decide(device_type: str, requested: str) -> tuple[str, str]:
    """(backend, why) for tensors on ``device_type``; raises when ``requested`` cannot be met."""
    if requested not in _REQUESTS:
        raise ValueError(f"{ENV_VAR}={requested!r} is not a kernel backend; allowed: {', '.join(_REQUESTS)} "
                         f"(or unset it for auto).")
    if requested == "torch":
        return "torch", f"{ENV_VAR}=torch"
    why_not = triton_import_error()
    if requested == "triton":
        if why_not is not None:
            raise RuntimeError(f"{ENV_VAR}=triton but triton cannot be imported ({why_not}). Install triton, "
                               f"or unset {ENV_VAR} / set it to torch.")
        if device_type == "cuda":
            mode = "interpreter" if interpreter_active() else "compiled"
            return "triton", f"{ENV_VAR}=triton, cuda tensors ({mode})"
        if not interpreter_active():
            raise RuntimeError(_cpu_triton_error(device_type))
        return "triton", f"{ENV_VAR}=triton, {device_type} tensors in the Triton interpreter"
    # auto
    if device_type != "cuda":
        return "torch", f"auto: {device_type} tensors"
    if why_not is not None:
        return "torch", f"auto: cuda tensors but triton does not import ({why_not})"
    return "triton", "auto: cuda tensors and triton imports"


_DECISIONS: dict[tuple[str, str], str] = {}


def select_backend(device: torch.device | str) -> str:
    """``"triton"`` or ``"torch"`` for tensors on ``device``, following ``FASTLT_KERNELS``.

    Raises ``RuntimeError`` when ``FASTLT_KERNELS=triton`` cannot run on ``device`` and
    ``ValueError`` for an unknown ``FASTLT_KERNELS`` value.
    """
    device_type = torch.device(device).type
    requested = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    key = (device_type, requested)
    backend = _DECISIONS.get(key)
    if backend is None:  # a new decision (errors are not cached: they raise every time)
        backend, why = _decide(device_type, requested)
        _DECISIONS[key] = backend
        logger.info("fastlt kernels: %s backend for %s tensors (%s)", backend, device_type, why)
    return backend


# torch.compile traces through the losses and labels: the decision is a constant of the
# process, so Dynamo should evaluate it once at trace time rather than trace the import
# checks. This is what torch.compiler.assume_constant_result does (it sets this attribute),
# minus its `import torch._dynamo`, which imports triton and would fix triton's interpreter
# mode as a side effect of importing fastlt. tests/test_kernels_soft_ce.py compiles a loss
# with fullgraph=True and an empty decision cache, so it fails if torch changes this.
select_backend._dynamo_marked_constant = True


def _reset_for_tests() -> None:
    """Forget cached decisions (tests change the environment between cases)."""
    _DECISIONS.clear()
    _import_triton.cache_clear()

