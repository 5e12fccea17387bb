"""What the DALI training and validation pipelines share (docs/design.md §3): device and dataset
checks, the lifetime of the DALI pipeline object, copying DALI outputs into torch tensors, and
the recovery from a decoder failure — traced back to the file with PIL, then reported
(``on_error: raise``) or left out on a rebuilt pipeline (``skip``) — and the check that the
Python reader processes are alive before each run.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import warnings

import torch

from .common import (BadImageError, PipelineError, check_dataset, decode_image, default_workers, die_with_parent,
                     image_source_name, image_storage)
from .dali_sources import raise_from_worker

__all__ = ["DaliPipelineBase", "cuda_index", "feed_into", "quiet_dali_build", "readers_die_with_us", "to_torch"]

_QUIET = re.compile(r"(WARNING: `nvidia\.dali\.fn\.experimental\.\w+` is now deprecated"
                    r"|The external source node .* produces \d+ outputs, but)")


@contextlib.contextmanager
def quiet_dali_build():
    """Silence two known, harmless warnings while a graph is built: DALI's auto_aug still calls
    the deprecated ``fn.experimental`` aliases, and a source output a recipe does not use
    (e.g. blur σ outside CIFAR) is reported as wasted work (a few bytes per sample).

    DALI issues the first one under its own ``simplefilter("default")``, which overrides any
    filter set here, so the messages are dropped at ``showwarning`` instead; every other
    warning is shown as usual."""
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if not _QUIET.match(str(message)):
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


# The pid of a process inside ``readers_die_with_us`` (None outside): a child forked then is a
# DALI reader, and the fork hook below makes it die with its parent.
_STARTING: int | None = None


def _after_fork_in_child() -> None:
    global _STARTING
    if _STARTING is not None:
        parent, _STARTING = _STARTING, None
        die_with_parent(parent)


os.register_at_fork(after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def readers_die_with_us():
    """Around ``pipe.build()``, which starts the pipeline's Python reader processes: each of them
    is killed by the kernel when this process ends, however it ends (``die_with_parent``), so
    that a trainer killed with SIGKILL leaves none behind. This covers readers forked here
    (``py_start_method="fork"``); spawned readers do the same when they unpickle their source
    (``common.SpawnedReaderSource``). The kernel ties this to the thread that started the
    readers, so build a pipeline in a thread that outlives it (the trainer builds and rebuilds
    them in its main thread).

    A reader that dies before it reports ready (killed while it starts) makes DALI raise a bare
    RuntimeError; it becomes the PipelineError of a dead reader."""
    global _STARTING
    _STARTING = os.getpid()
    try:
        yield
    except RuntimeError as e:
        if "Workers initialization failed" not in str(e):
            raise
        raise PipelineError("a DALI reader process died while the pipeline started its readers (DALI: "
                            f"{e})") from None
    finally:
        _STARTING = None


def _dense(tensor_list):
    return tensor_list.as_tensor() if hasattr(tensor_list, "as_tensor") else tensor_list


def feed_into(tensor_list, out: torch.Tensor) -> torch.Tensor:
    """Copy a DALI batch (uniform shape) into the contiguous torch tensor ``out`` (its device,
    dtype and shape must match). The copy is needed: DALI reuses its output buffers."""
    from nvidia.dali.plugin.pytorch import feed_ndarray

    stream = torch.cuda.current_stream(out.device) if out.device.type == "cuda" else None
    feed_ndarray(_dense(tensor_list), out, cuda_stream=stream)  # GPU: an async copy on the current stream
    return out


def to_torch(tensor_list, device: torch.device, *, pin: bool = False) -> torch.Tensor:
    """A DALI batch (uniform shape) copied into a new torch tensor on ``device`` (in pinned
    host memory with ``pin``, so that a later copy to the GPU need not wait)."""
    from nvidia.dali.plugin.pytorch import to_torch_type

    t = _dense(tensor_list)
    out = torch.empty(tuple(t.shape()), dtype=to_torch_type[t.dtype], device=device, pin_memory=pin)
    return feed_into(t, out)


def cuda_index(device: torch.device) -> int:
    """The CUDA device ordinal for DALI: the explicit index, else the current device (set per
    local rank by the trainer), never a silent GPU 0 on a multi-GPU node."""
    return device.index if device.index is not None else torch.cuda.current_device()


def _pil_decodes(dataset, index: int, max_pixels: int) -> str | None:
    """None if PIL decodes image ``index`` fully, else why not."""
    try:
        decode_image(dataset.read_bytes(index), max_pixels)
    except (OSError, ValueError) as e:  # decode_image turns every decode failure into a ValueError
        return f"{type(e).__name__}: {e}"
    return None


class DaliPipelineBase:
    """A DALI pipeline object built on demand, dropped on failure, rebuilt at a position.

    Subclasses build ``self._pipe`` and record in ``self._position`` where the live pipeline
    would continue (None when unknown); :meth:`_drop` forgets both.
    """

    backend = "dali"

    def __init__(self, spec):
        check_dataset(spec)
        self.spec = spec
        self._device = torch.device(spec.device)
        if self._device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"pipeline device {spec.device!r} requested but CUDA is not available; use 'cpu'")
        self.num_threads = max(1, default_workers(spec.num_workers))
        self._bad: set[int] = set()  # dataset indices the DALI decoder failed on
        self._pipe = None
        self._position = None
        self._stats = {"skipped_images": 0, "skipped_files": []}

    @property
    def gpu(self) -> bool:
        return self._device.type == "cuda"

    def _pool_processes(self) -> tuple:
        return getattr(getattr(getattr(self._pipe, "_py_pool", None), "pool", None), "_processes", None) or ()

    def _kill_survivors(self) -> list:
        """When a reader process of the live pipeline has died: SIGKILL the others and return the
        dead ones ([] when none died). The survivors ignore SIGTERM (fastlt.training.signals), and
        DALI's pool, once one of its processes is gone, terminates the rest with SIGTERM and
        joins them without a timeout: its shutdown would wait forever on them."""
        procs = self._pool_processes()
        dead = [p for p in procs if p.exitcode is not None]
        if dead:
            for p in procs:
                if p.exitcode is None:
                    p.kill()
                    p.join(5)
        return dead

    def _drop(self) -> None:
        if self._pipe is not None:
            self._kill_survivors()  # a pool with a dead reader cannot shut down gracefully
            pipe, self._pipe = self._pipe, None
            pipe._shutdown()  # stops DALI's executor; the Python worker pool closes with the object
            del pipe
        self._position = None

    def close(self) -> None:
        """Stop the DALI pipeline and its Python workers."""
        self._drop()

    def __del__(self):
        try:
            self._drop()
        except Exception:  # interpreter shutdown: DALI may already be gone
            pass

    def _check_workers(self) -> None:
        """PipelineError if a Python reader process of the live pipeline has died (killed, e.g. by
        the out-of-memory killer). Asked before every run: DALI's pool would otherwise wait
        forever on a condition the dead process can no longer signal."""
        dead = self._kill_survivors()
        if not dead:
            return
        p = dead[0]
        how = (f"was killed by signal {signal.Signals(-p.exitcode).name}" if p.exitcode < 0
               else f"exited with code {p.exitcode}")
        self._drop()
        raise PipelineError(f"a DALI reader process (pid {p.pid}) {how}")

    def stats(self) -> dict:
        """Counters of the last epoch or pass: ``skipped_images`` and the ``skipped_files`` names."""
        return {"skipped_images": self._stats["skipped_images"], "skipped_files": list(self._stats["skipped_files"])}

    def _count_skipped(self, names) -> None:
        for name in names:
            self._stats["skipped_images"] += 1
            self._stats["skipped_files"].append(name)

    def _undecodable(self, err: Exception, candidates, where: str) -> tuple[list[int], str]:
        """After a failed run: (dataset indices among ``candidates`` that PIL cannot decode, their
        names). A reader's BadImageError is re-raised as such; a failure no image explains is a
        RuntimeError with DALI's message. The failed pipeline is dropped either way (a DALI
        pipeline object cannot run again after an error). A reader that died while DALI waited on
        it is reported as such (PipelineError), not searched for as a bad image."""
        self._check_workers()
        self._drop()
        raise_from_worker(err)
        if image_storage(self.spec.dataset) == "arrays":
            raise err  # nothing is decoded: no file can be at fault
        culprits = []
        for idx in dict.fromkeys(int(i) for i in candidates):
            if idx in self._bad:
                continue
            why = _pil_decodes(self.spec.dataset, idx, self.spec.max_image_pixels)
            if why is not None:
                culprits.append((idx, why))
        if not culprits:
            raise RuntimeError(f"the DALI pipeline failed {where}, and no image there fails to decode with PIL; "
                               f"DALI said: {err}") from err
        names = "; ".join(f"{image_source_name(self.spec.dataset, i)} ({why})" for i, why in culprits)
        return [i for i, _ in culprits], names

    def _raise_or_mark(self, err: Exception, bad: list[int], names: str, what: str, skip_does: str) -> None:
        """``on_error: raise``: BadImageError naming the files; ``skip``: remember them as bad."""
        if self.spec.on_error == "raise":
            raise BadImageError(f"cannot decode {what} {names}. Fix or remove the file(s), or set data.on_error: "
                                f"skip to {skip_does}") from err
        self._bad.update(bad)
