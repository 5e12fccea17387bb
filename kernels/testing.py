"""Helpers for testing fastlt's Triton kernels against their references (ARCHITECTURE §3).

On a machine with CUDA the parity tests run the compiled kernels on the GPU. On a CPU
machine they run in Triton's interpreter, which must be switched on with
``TRITON_INTERPRET=1`` *before triton is first imported in the process* (triton fixes the
mode of ``tl.sum``, ``tl.max``, ... at import time). A test module calls
:func:`prepare_interpreter` before anything else; if another module of the same pytest
session imported triton first (torchvision and timm do), the in-process cases cannot run
and :func:`run_module_in_fresh_interpreter` re-runs the module in a new Python process with
the variable set from the start. Exactly one of the two paths runs.

:func:`count_launches` counts the kernel launches (and host reads) of one call, for the
benchmarks: CUDA kernel events on a GPU, dispatched PyTorch operators plus fastlt's Triton
launches on the CPU.
"""
from __future__ import annotations

import collections
import os
import subprocess
import sys
from pathlib import Path

import torch

__all__ = ["count_launches", "describe_mismatch", "in_child_process", "kernel_device", "prepare_interpreter",
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


# Operators that only make a view, allocate, or answer a question about metadata: they
# launch no kernel on a GPU, so the CPU count leaves them out.
_NO_KERNEL_OPS = frozenset(f"aten::{name}" for name in (
    "alias", "as_strided", "detach", "empty", "empty_like", "empty_strided", "expand", "expand_as", "lift_fresh",
    "narrow", "permute", "promote_types", "reshape", "resolve_conj", "resolve_neg", "result_type", "select", "slice",
    "split", "squeeze", "t", "transpose", "unbind", "unflatten", "unsqueeze", "view", "view_as", "_reshape_alias",
    "_unsafe_view", "chunk", "flatten", "contiguous", "to", "type_as", "new_empty", "new_empty_strided",
    "is_nonzero", "size", "stride", "numel", "dim", "requires_grad_", "set_", "resize_"))
_HOST_READS = frozenset(("aten::_local_scalar_dense", "aten::item"))


def count_launches(fn, device: str | torch.device) -> dict:
    """Kernel launches of one call of ``fn()`` on ``device``, counted with ``torch.profiler``.

    Run ``fn`` once beforehand (compilation, caches): the count is of a warm call.

    * CUDA: ``launches`` is the number of kernel events the profiler saw on the device (every
      PyTorch and Triton kernel), ``memory_ops`` the memset/memcpy events; ``host_syncs``
      counts ``cudaStreamSynchronize`` / ``cudaDeviceSynchronize`` calls and scalar reads
      (``.item()``, ``bool(t)``) made by ``fn``.
    * CPU: ``launches`` = ``torch_ops`` + ``triton``. ``torch_ops`` counts the outermost
      ``aten::`` operators (not nested in another operator or in a Triton launch) that do any
      work: views, allocations and metadata queries are left out, since they launch nothing on
      a GPU. An operator launches one kernel on a GPU in most cases (some launch two), so this
      is a proxy, not a measurement of a GPU. ``triton`` counts fastlt's Triton launches
      (``triton::<kernel>`` ranges recorded by ``fastlt.kernels._jit``; in the interpreter on
      CPU). ``host_syncs`` counts scalar reads, each of which would be a sync on a GPU. Code
      compiled by ``torch.compile``'s C++ backend is invisible to this count: only its calls
      into ``aten`` (e.g. matrix products) are seen.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"count_launches: device must be a cpu or cuda device; got {device}")
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        with record_function("fastlt::count_launches"):
            fn()
        if cuda:
            torch.cuda.synchronize(device)
    events = prof.events()
    window = [e for e in events if e.name == "fastlt::count_launches"]
    if len(window) != 1:
        raise RuntimeError(f"count_launches: expected one profiler range around the call, found {len(window)}")
    start, end = window[0].time_range.start, window[0].time_range.end

    def inside(e):
        return e.device_type == DeviceType.CPU and start <= e.time_range.start and e.time_range.end <= end

    def nested(e):
        parent = e.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::") or parent.name.startswith("triton::"):
                return True
            parent = parent.cpu_parent
        return False

    def does_work(e):  # a scalar read is a copy to the host, counted as a sync, not a launch
        return e.name not in _NO_KERNEL_OPS and e.name not in _HOST_READS or any(
            does_work(child) for child in e.cpu_children if child.name.startswith("aten::"))

    cpu_events = [e for e in events if inside(e)]
    triton = sum(1 for e in cpu_events if e.name.startswith("triton::") and not nested(e))
    host_reads = sum(1 for e in cpu_events if e.name in _HOST_READS and not nested(e))
    if cuda:
        device_events = [e for e in events if e.device_type == DeviceType.CUDA]
        memory = sum(1 for e in device_events if e.name.lower().startswith(("memcpy", "memset")))
        syncs = sum(1 for e in cpu_events if e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize"))
        return dict(launches=len(device_events) - memory, memory_ops=memory, triton=triton,
                    host_syncs=syncs + host_reads, method="cuda kernel events")
    counted = [e.name for e in cpu_events if (e.name.startswith("aten::") and does_work(e) or
                                              e.name.startswith("triton::")) and not nested(e)]
    return dict(launches=len(counted), torch_ops=len(counted) - triton, triton=triton, host_syncs=host_reads,
                method="cpu: outermost working aten ops + fastlt triton launches",
                ops=dict(collections.Counter(counted)))
