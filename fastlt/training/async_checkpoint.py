"""Asynchronous checkpoint writing (``run.async_checkpoint``): training is blocked only while a
checkpoint's state is copied to host memory; the files are written by a background thread.

The pattern is the one of ``torch.distributed.checkpoint.async_save`` (stage to CPU, then write
in a thread, wait before the next save), on DeepSpeed's own checkpoint-engine hook: DeepSpeed's
``save_checkpoint`` hands each file's state to ``checkpoint_engine.save(state, path)``, which
here copies the state (:func:`snapshot`) and queues the write (:class:`BackgroundWriter`).
DeepSpeed's ``DecoupledCheckpointEngine`` is not used: it writes through DeepNVMe's
``async_io`` op (not available on every machine, CPU ones included) and hands the live
tensors to its writer process, so a step taken during the write could reach the file.
``torch.distributed.checkpoint.async_save`` writes its own format, which DeepSpeed's loader and
its universal checkpoint cannot read.

What stays as in a synchronous save (``fastlt.training.checkpoint``): every file goes to
``<tag>.partial`` through temp file + fsync + ``os.replace``; the folder is renamed to ``<tag>``
and ``latest`` moved only after every rank's writer has finished without error
(:meth:`CheckpointManager.wait`, on the training thread, where the collectives are). A crash,
a kill or a failed write during the background write leaves ``latest`` at the previous
complete checkpoint. The trainer waits for the write before the next save, before an
evaluation (so that a stop during it resumes as without this key: the evaluation first), before
a stop's exit and before the final report; after a failure (an exception, a lost rank) it lets
the write end but publishes nothing, as no collective can be trusted then.

Host memory: a rank holds one extra copy of what it writes while the write runs (at ZeRO-0,
rank 0 the whole model and optimizer state; at ZeRO 1-2, the model plus its optimizer shard).
"""
from __future__ import annotations

import copy
import queue
import shutil
import threading
from pathlib import Path

import torch

from fastlt.errors import OutputError
from fastlt.files import torch_save_atomic, write_text_atomic
from fastlt.training.distributed import any_rank

__all__ = ["AsyncSaves", "BackgroundWriter", "snapshot"]


def snapshot(obj, _memo: dict | None = None):
    """A deep copy of a checkpoint's state whose tensors are detached host copies: what the
    training thread may change afterwards (weights, momentum, lists) cannot reach the file.
    Tensors that share a storage (DeepSpeed's parameters are views into flat buffers under ZeRO)
    still share one copied storage, so ``torch.save`` writes the same records as from the live
    state. Containers keep their type (dict, OrderedDict, list, tuple, named tuple)."""
    memo = {} if _memo is None else _memo
    if isinstance(obj, torch.Tensor):
        return _copy_tensor(obj.detach(), memo)
    if isinstance(obj, dict):
        out = copy.copy(obj)  # same class (OrderedDict, ...), then every value replaced
        for k, v in obj.items():
            out[k] = snapshot(v, memo)
        return out
    if isinstance(obj, list):
        return [snapshot(v, memo) for v in obj]
    if isinstance(obj, tuple):
        items = [snapshot(v, memo) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return copy.deepcopy(obj)


def _copy_tensor(t: torch.Tensor, memo: dict) -> torch.Tensor:
    storage = t.untyped_storage()
    key = (t.device, storage.data_ptr(), storage.nbytes())
    if key not in memo:  # the whole storage as bytes, copied to host memory (from any device)
        raw = torch.empty((0,), dtype=torch.uint8, device=t.device).set_(storage)
        memo[key] = raw.to("cpu", copy=True).untyped_storage()
    out = torch.empty((0,), dtype=t.dtype)
    out.set_(memo[key], t.storage_offset(), t.size(), t.stride())
    return out


class BackgroundWriter:
    """One thread writing queued files in order; :meth:`wait` blocks until all are written and
    returns the first error (None when every file was written). After an error the files still
    queued are dropped: the checkpoint is incomplete anyway and is never published."""

    def __init__(self):
        self._jobs: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def submit(self, state, path: str | Path) -> None:
        """Copy ``state`` now (:func:`snapshot`), write it to ``path`` (torch.save, atomic) later."""
        self._put(torch_save_atomic, snapshot(state), Path(path))

    def submit_text(self, path: str | Path, text: str) -> None:
        """Write ``text`` to ``path`` (atomic) after the files queued before it."""
        self._put(write_text_atomic, Path(path), text)

    def _put(self, write, *args) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="fastlt-checkpoint-writer", daemon=True)
            self._thread.start()
        self._jobs.put((write, args))

    def _run(self) -> None:
        while True:
            write, args = self._jobs.get()
            try:
                if self._error is None:
                    write(*args)
            except BaseException as e:  # reported by wait(), on the training thread
                self._error = e
            finally:
                del args
                self._jobs.task_done()

    def busy(self) -> bool:
        """Whether a queued file is still being written."""
        return self._jobs.unfinished_tasks > 0

    def wait(self) -> BaseException | None:
        """Block until every queued file is written; the first error since the last wait, if any."""
        self._jobs.join()
        error, self._error = self._error, None
        return error


def _collective_device():
    """Where a flag all-reduce runs: the current GPU under NCCL, the host otherwise."""
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class AsyncSaves:
    """The asynchronous half of ``fastlt.training.checkpoint.CheckpointManager`` (its base class):
    the writer, :meth:`wait` and :meth:`abandon`. Expects the manager's ``_writer``, ``_pending``,
    ``local_rank``, ``_not_written``, ``_kept`` and ``_complete``."""

    _writer: BackgroundWriter | None = None
    _pending: tuple | None = None

    def _writer_of(self, engine):
        if not hasattr(type(engine.checkpoint_engine), "writer"):
            raise RuntimeError("run.async_checkpoint needs fastlt's checkpoint engine "
                               "(fastlt.training.engine.build_engine installs it)")
        self._writer = self._writer or BackgroundWriter()
        return self._writer

    def wait(self, on_saved=None) -> Path | None:
        """Finish the asynchronous save in flight, all ranks together: wait for every rank's
        writer, then rename ``<tag>.partial`` and move ``latest`` (as a synchronous save does).
        Returns the published checkpoint, None when no save was in flight. When any rank's
        write failed, nothing is published and every rank raises OutputError."""
        if self._pending is None:
            return None
        tag, partial, final = self._pending
        # Pending until the writer is done: a stop raised in this wait (a signal) leaves it pending,
        # so close() -> abandon() still lets the write end before the process exits.
        error = self._writer.wait()
        self._pending = None
        if any_rank([error is not None], _collective_device())[0]:
            if isinstance(error, OutputError):
                raise self._not_written(error, tag, partial) from None
            if self.local_rank == 0:
                shutil.rmtree(partial, ignore_errors=True)
            if error is not None:
                raise error
            raise OutputError(f"checkpoint {tag} was not written: another rank's background write failed (its "
                              f"output says why); {self._kept()}; fix that, then continue with --resume auto")
        self._complete(partial, final, tag, on_saved)
        return final

    @property
    def pending(self) -> bool:
        """Whether an asynchronous save is in flight (not yet published)."""
        return self._pending is not None

    def writing(self) -> bool:
        """Whether this rank's background write of the pending save is still running. The trainer
        asks at every log interval (with its other flags, in one all-reduce) and publishes the
        save as soon as no rank is writing, so that a finished checkpoint is used at once."""
        return self._pending is not None and self._writer.busy()

    def abandon(self) -> None:
        """After a failure: let this rank's background write end, publish nothing (no collective:
        other ranks may be gone); ``latest`` keeps pointing at the last complete checkpoint."""
        if self._pending is not None:
            self._pending = None
            self._writer.wait()
