"""Helpers for testing fastlt's Triton kernels against their references (docs/design.md §3).

On a machine with CUDA the parity tests run the compiled kernels on the GPU. On a CPU
machine they run in Triton's interpreter, which must be switched on with
``TRITON_INTERPRET=1`` *before triton is first imported in the process* (triton fixes the
mode of ``tl.sum``, ``tl.max``, ... at import time; torchvision and timm import it).
:func:`prepare_interpreter` does that; the test suite's ``tests/conftest.py`` calls it before
any test module is imported, so every kernel case runs in the pytest process (each xdist
worker included) and is reported once, as passed or failed. :func:`skip_reason_in_process`
is then a reason only where the machine lacks something (triton itself).

:func:`count_launches` counts the kernel launches (and host reads) of one call, for the
benchmarks: CUDA kernel events on a GPU, dispatched PyTorch operators plus fastlt's Triton
launches on the CPU. :func:`analyse_events` is that count over any windows of a profiler's
events; ``fastlt profile`` (``fastlt.reports.profiling``) uses it per training step.
"""
from __future__ import annotations

import collections
import os
import sys

import torch

__all__ = ["analyse_events", "count_launches", "describe_mismatch", "event_windows", "kernel_device",
           "prepare_interpreter", "skip_reason_in_process"]


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
    """Why the Triton kernels cannot run on this machine (None if they can).

    Raises RuntimeError, saying the fix, when they could but this process imported triton
    before :func:`prepare_interpreter` ran: that is a set-up mistake, not a reason to skip.
    """
    from .dispatch import interpreter_active, triton_import_error

    why = triton_import_error()
    if why is not None:
        return f"triton does not import ({why})"
    if kernel_device() == "cuda":
        if interpreter_active():
            return "TRITON_INTERPRET=1 with a GPU visible: run the GPU parity tests without it"
        return None
    if not interpreter_active():
        raise RuntimeError("triton was imported in compiled mode before TRITON_INTERPRET=1 was set, so its "
                           "interpreter cannot run the kernels on the CPU here: call "
                           "fastlt.kernels.testing.prepare_interpreter() before anything imports triton "
                           "(tests/conftest.py does), or start Python with TRITON_INTERPRET=1")
    return None


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
# Operators whose output size depends on the values: the host reads the size (a sync on a GPU).
_VALUE_SIZED_OPS = frozenset(("aten::nonzero", "aten::masked_select", "aten::_unique2", "aten::unique_dim",
                              "aten::unique_consecutive"))
_SYNC_CALLS = frozenset(("cudaStreamSynchronize", "cudaDeviceSynchronize"))


def count_launches(fn, device: str | torch.device) -> dict:
    """Kernel launches of one call of ``fn()`` on ``device``, counted with ``torch.profiler``.

    Run ``fn`` once beforehand (compilation, caches): the count is of a warm call. The events
    are read by :func:`analyse_events` (one window: the call), which says what is counted on
    CUDA and on CPU.
    """
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
    windows = event_windows(events, "fastlt::count_launches")
    if len(windows) != 1:
        raise RuntimeError(f"count_launches: expected one profiler range around the call, found {len(windows)}")
    # The profile spans the call only: every device event in it is the call's.
    (got,) = analyse_events(events, windows, cuda=cuda)
    if cuda:
        got["launches"] += got.pop("unlinked_kernels")
    return got


def event_windows(events, name: str) -> list[tuple[float, float]]:
    """(start, end) in µs of every CPU range called ``name`` (a ``record_function``), in order."""
    from torch.autograd import DeviceType

    return sorted((e.time_range.start, e.time_range.end) for e in events
                  if e.name == name and e.device_type == DeviceType.CPU)


def analyse_events(events, windows, *, cuda: bool) -> list[dict]:
    """Kernel launches and host syncs in each ``(start, end)`` window (µs) of one profile's events
    (``prof.events()`` of ``torch.profiler.profile``); one dict per window.

    * CUDA (``cuda=True``, a profile with CUDA activity): ``launches`` counts the device kernel
      events launched from an operator or range inside the window (every PyTorch and Triton
      kernel); a kernel with no launch site among the profile's operators (a Triton launch
      outside any operator, a data pipeline's own DALI kernels) is ``unlinked_kernels`` of the
      window in which it started on the device; ``memory_ops`` counts the memset/memcpy events
      of both kinds.
      ``host_syncs`` = ``sync_calls`` (``cudaStreamSynchronize`` / ``cudaDeviceSynchronize``
      calls made in the window, by any thread) + the scalar reads that made none of them.
    * CPU: ``launches`` = ``torch_ops`` + ``triton``. ``torch_ops`` counts the outermost
      ``aten::`` operators (not nested in another operator or in a Triton launch) that do any
      work: views, allocations and metadata queries are left out, since they launch nothing on
      a GPU. An operator launches one kernel on a GPU in most cases (some launch two), so this
      is a proxy, not a measurement of a GPU. ``triton`` counts fastlt's Triton launches
      (``triton::<kernel>`` ranges recorded by ``fastlt.kernels._jit``; in the interpreter on
      CPU). ``host_syncs`` = ``scalar_reads``, each of which would be a sync on a GPU. Code
      compiled by ``torch.compile``'s C++ backend is invisible to this count: only its calls
      into ``aten`` (e.g. matrix products) are seen.

    ``scalar_reads`` (both devices) counts ``.item()``, ``int(t)``, ``bool(t)`` and the operators
    whose output size depends on the values (``nonzero``, boolean indexing): the outermost of
    them, outside Triton launches. ``sync_sites`` counts the host syncs by where they were made
    (``"<innermost enclosing range> > <operator or call>"``); ``ops`` (CPU) is the count of each
    counted operator.
    """
    import bisect

    from torch.autograd import DeviceType

    cpu_events = sorted((e for e in events if e.device_type == DeviceType.CPU), key=lambda e: e.time_range.start)
    cpu_starts = [e.time_range.start for e in cpu_events]
    starts = [w[0] for w in windows]
    device: list[list] = [[] for _ in windows]  # each window's device events launched inside it
    unlinked: list[list] = [[] for _ in windows]
    if cuda:
        launch_sites = {e.id: e for e in cpu_events if e.linked_correlation_id == 0}
        for e in events:
            if e.device_type != DeviceType.CUDA or e.is_user_annotation or (
                    getattr(e, "activity_type", None) == "gpu_user_annotation"):
                continue  # a range's span on the device timeline, not a kernel
            site = launch_sites.get(e.linked_correlation_id) if e.linked_correlation_id else None
            t = (site or e).time_range.start
            i = bisect.bisect_right(starts, t) - 1
            if site is not None:
                if i >= 0 and t <= windows[i][1]:
                    device[i].append(e)
            elif windows:
                unlinked[max(i, 0)].append(e)

    def ancestors(e):
        parent = e.cpu_parent
        while parent is not None:
            yield parent
            parent = parent.cpu_parent

    def nested(e):
        return any(p.name.startswith(("aten::", "triton::")) for p in ancestors(e))

    def is_read(e):
        return e.name in _HOST_READS or e.name in _VALUE_SIZED_OPS

    def outermost_read(e):
        return is_read(e) and not any(is_read(p) or p.name.startswith("triton::") for p in ancestors(e))

    def site(e):  # "<innermost enclosing range> > <op>" of a sync
        return f"{next((p.name for p in ancestors(e) if not p.name.startswith('aten::')), '-')} > {e.name}"

    def does_work(e):  # a scalar read is a copy to the host, counted as a sync, not a launch
        return e.name not in _NO_KERNEL_OPS and e.name not in _HOST_READS or any(
            does_work(child) for child in e.cpu_children if child.name.startswith("aten::"))

    out = []
    for (start, end), device_events, loose in zip(windows, device, unlinked):
        lo, hi = bisect.bisect_left(cpu_starts, start), bisect.bisect_right(cpu_starts, end)
        inside = [e for e in cpu_events[lo:hi] if e.time_range.end <= end]
        triton = sum(1 for e in inside if e.name.startswith("triton::") and not nested(e))
        reads = [e for e in inside if outermost_read(e)]
        if cuda:
            memory = sum(1 for e in device_events + loose if _is_memory_op(e))
            kernels = sum(1 for e in device_events if not _is_memory_op(e))
            loose = sum(1 for e in loose if not _is_memory_op(e))
            syncs = [e for e in inside if e.name in _SYNC_CALLS]
            waited = {id(p) for s in syncs for p in ancestors(s)}  # reads that made a sync call
            silent_reads = [r for r in reads if id(r) not in waited]
            out.append(dict(launches=kernels, memory_ops=memory, unlinked_kernels=loose,
                            triton=triton, host_syncs=len(syncs) + len(silent_reads), sync_calls=len(syncs),
                            scalar_reads=len(reads), method="cuda kernel events",
                            sync_sites=dict(collections.Counter(map(site, syncs + silent_reads)))))
            continue
        counted = [e.name for e in inside if (e.name.startswith("aten::") and does_work(e) or
                                              e.name.startswith("triton::")) and not nested(e)]
        out.append(dict(launches=len(counted), torch_ops=len(counted) - triton, triton=triton,
                        host_syncs=len(reads), scalar_reads=len(reads),
                        sync_sites=dict(collections.Counter(map(site, reads))),
                        method="cpu: outermost working aten ops + fastlt triton launches",
                        ops=dict(collections.Counter(counted))))
    return out


def _is_memory_op(e) -> bool:
    return getattr(e, "activity_type", None) in ("gpu_memcpy", "gpu_memset") or e.name.lower().startswith(
        ("memcpy", "memset"))
