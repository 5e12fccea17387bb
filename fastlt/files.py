"""Files that are never half-written and never run code when read.

* :func:`write_text_atomic`, :func:`torch_save_atomic` — write to a temporary sibling, then
  ``os.replace``: readers see the old or the new content, never a mix;
* :func:`safe_load` — ``torch.load`` with ``weights_only=True``; the only non-tensor classes
  allowed are the few DeepSpeed bookkeeping types of :func:`deepspeed_safe_globals`;
* :func:`install_safe_checkpoint_engine` — the same two rules for every file DeepSpeed's
  engine reads or writes;
* :func:`json_text` — strict JSON (nan/inf become null), so every JSON file fastlt writes parses;
* :func:`damage` — why a ``torch.save`` file cannot be complete (a cheap look at its zip
  directory), and :func:`check_writable_dir` / :func:`check_output_file` — whether a run
  directory or an output file can be written, asked before any work is done;
* what a path is, before it is opened: ``fastlt.paths``.

A failed write raises :class:`~fastlt.errors.OutputError` naming the path and the cause (a full
disk, a read-only folder, a file size limit) and leaves no temporary file behind.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import uuid
import zipfile
from pathlib import Path

from fastlt.errors import REASONS, CheckpointError, OutputError
from fastlt.paths import kind_of, path_problem

__all__ = ["check_output_file", "check_writable_dir", "damage", "deepspeed_safe_globals",
           "install_safe_checkpoint_engine", "json_text", "safe_load", "torch_save_atomic", "write_failure",
           "write_text_atomic"]



def _existing_dir(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path if path.is_dir() else path.parent


def write_failure(path: str | os.PathLike, err: BaseException) -> OutputError:
    """The OutputError for a failed write of ``path``: the cause, the free space there and, when
    one applies, the process's file size limit (torch's own writer reports only "unexpected pos")."""
    try:
        free = shutil.disk_usage(_existing_dir(Path(path))).free
    except OSError:
        free = None
    if isinstance(err, OSError) and err.errno is not None:
        reason = REASONS.get(err.errno, err.strerror or str(err))
    elif free is not None and free < 64 * 2**20:  # a short write on a (nearly) full file system
        reason = "the disk is full"
    else:
        reason = "the write stopped short (fewer bytes reached the file than were written)"
    notes = [] if free is None else [f"{free / 2**20:.0f} MiB free on that file system"]
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY:
            notes.append(f"this process may not write files over {limit} bytes (ulimit -f)")
    except (ImportError, ValueError, OSError):
        pass
    return OutputError(f"cannot write {path}: {reason}" + (f" ({'; '.join(notes)})" if notes else ""))


def _is_write_error(err: BaseException) -> bool:
    # torch's zip writer turns a short write into a RuntimeError from inline_container.cc.
    return isinstance(err, OSError) or (isinstance(err, RuntimeError) and
                                        ("inline_container" in str(err) or "PytorchStreamWriter" in str(err)))



def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file so that readers see the old or the new content, never a mix."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise write_failure(path, e) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def torch_save_atomic(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary sibling, flushed to disk, then renamed over ``path``."""
    import torch  # here, not at the top: the data readers use this module without loading torch

    path = Path(path)
    tmp = _tmp_name(path)
    try:
        # Through a Python file object: a full disk then surfaces as OSError(ENOSPC) rather than
        # torch's "enforce fail at inline_container.cc"; fsync so that the rename never publishes
        # a file whose data is still in the page cache.
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if not _is_write_error(e):
            raise
        raise write_failure(path, e) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def json_text(obj, indent: int | None = 1) -> str:
    """``json.dumps`` that is valid JSON: nan/inf (e.g. the accuracy of an empty shot group) become null."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), indent=indent, allow_nan=False)


def damage(path: str | os.PathLike) -> str | None:
    """Why the ``torch.save`` file ``path`` cannot be complete (missing, empty, truncated), or None.

    Reads only the zip directory at the end of the file, so it costs the same for any size: a
    file cut short by a crash or a full disk has lost that directory."""
    path = Path(path)
    if not path.is_file():
        return "the file is missing"
    if path.stat().st_size == 0:
        return "the file is empty"
    try:
        with zipfile.ZipFile(path) as z:
            z.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"truncated or corrupt: {e}"
    return None


def _probe(folder: Path) -> OSError | None:
    """Create and remove a file in ``folder``: the only check that also holds for root, read-only
    mounts, ACLs and network file systems (os.access does not)."""
    try:
        tmp = folder / f".fastlt-write-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        tmp.write_bytes(b"")
        tmp.unlink()
    except OSError as e:
        return e
    return None


def check_writable_dir(path: str | os.PathLike, what: str) -> None:
    """Raise OutputError unless the folder ``path`` exists and can be written, or can be created
    (its nearest existing ancestor is a writable folder). Creates nothing."""
    if (problem := path_problem(path)) is not None:
        raise OutputError(f"{what} {os.fspath(path)!r} cannot be a path: {problem}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} is {'a file' if path.is_file() else kind_of(path)}, not a folder; move it "
                          "away or choose another path")
    base = path
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise OutputError(f"{what} {path} cannot be created: {base} is a file, not a folder; choose another path")
    _require_new_files(base, what, path)


def _require_new_files(folder: Path, what: str, path: Path) -> None:
    """OutputError naming ``path`` and the cause unless ``folder`` accepts a new file."""
    err = _probe(folder)
    if err is not None:
        raise OutputError(f"{what} {path} cannot be written: {folder} does not accept new files "
                          f"({REASONS.get(err.errno, err.strerror)}); choose a writable folder")


def check_output_file(path: str | os.PathLike, what: str, *, new: bool = False) -> None:
    """Raise OutputError unless ``path`` can be written as a file (asked before the work that fills
    it); with ``new``, an existing file is refused too (fastlt does not overwrite it)."""
    if (problem := path_problem(path)) is not None:
        raise OutputError(f"{what} {os.fspath(path)!r} cannot be a path: {problem}")
    path = Path(path)
    kind = kind_of(path)
    if kind == "folder":
        raise OutputError(f"{what} {path} is a directory; give a file name, e.g. {path / 'metrics.json'}")
    if kind not in ("missing", "file", "a broken link"):
        raise OutputError(f"{what} {path} is {kind}, not a file that can be written; choose another path")
    if new and kind == "file":
        raise OutputError(f"{what} {path} already exists and fastlt does not overwrite it; choose a new name, or "
                          "remove the file first")
    parent = path.parent
    if not parent.is_dir():
        raise OutputError(f"{what} {path}: the folder {parent} does not exist; create it or choose another path")
    _require_new_files(parent, what, path)


def deepspeed_safe_globals() -> list:
    """The DeepSpeed classes that appear in its checkpoints (loss scaler, ZeRO stage enum,
    fragment addresses); nothing else beyond tensors and plain containers is unpickled."""
    out = []
    for module, names in (("deepspeed.runtime.fp16.loss_scaler",
                           ("LossScaler", "DynamicLossScaler", "LossScaleProfile", "LossScaleConfig")),
                          ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
                          ("deepspeed.utils.tensor_fragment", ("fragment_address",))):
        try:
            mod = __import__(module, fromlist=list(names))
        except ImportError:
            continue
        out.extend(getattr(mod, n) for n in names if hasattr(mod, n))
    return out


def safe_load(path: str | os.PathLike, map_location="cpu"):
    """``torch.load`` with ``weights_only=True`` and only DeepSpeed's bookkeeping classes allowed; a
    path that is not a regular file (a FIFO would block torch.load for ever) is refused unread."""
    import torch

    kind = kind_of(path)
    if kind not in ("file", "missing"):
        raise CheckpointError(f"checkpoint file {path} is {'a folder' if kind == 'folder' else kind}, not a regular "
                              "file; point at the checkpoint file itself")
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint file {path} does not exist") from None
        except Exception as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
            if isinstance(e, pickle.UnpicklingError) and lines[0].startswith("Weights only load failed"):
                # The allowlist refused a class: the file holds something other than tensors.
                refused = next((ln.rstrip(".") for ln in lines[1:] if "unsupported" in ln.lower()),
                               lines[0].split(". ")[0])
                raise CheckpointError(f"cannot load {path} safely: {refused}. fastlt only loads tensors and plain "
                                      "containers from checkpoints, never code") from None
            why = damage(path) or f"{type(e).__name__}: {lines[0]}"
            raise CheckpointError(f"checkpoint file {path} is damaged and cannot be read ({why}); "
                                  "use an earlier complete checkpoint") from None


def install_safe_checkpoint_engine(engine) -> None:
    """Make every DeepSpeed checkpoint read/write of ``engine`` safe (weights_only) and atomic."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        """TorchCheckpointEngine with atomic saves and ``weights_only=True`` loads. While
        ``writer`` is set (``fastlt.training.async_checkpoint.BackgroundWriter``, during an
        asynchronous save) a save copies the state and queues its write instead."""

        writer = None

        def save(self, state_dict, path: str):
            if self.writer is not None:
                self.writer.submit(state_dict, path)
            else:
                torch_save_atomic(state_dict, path)

        def load(self, path: str, map_location=None):
            return safe_load(path, map_location=map_location)

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise RuntimeError(f"unexpected DeepSpeed checkpoint engine {type(engine.checkpoint_engine).__name__}; "
                           "fastlt expects the default TorchCheckpointEngine (no 'checkpoint' section in the "
                           "DeepSpeed config)")
    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)
