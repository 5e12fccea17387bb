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
* :func:`path_problem`, :func:`expect_file`, :func:`expect_dir`, :func:`read_regular` — every
  path fastlt reads is checked for what it is first: text the file system cannot take (a NUL,
  an unpaired surrogate, a name over its length limit) is refused with one line, and a FIFO,
  socket or device named like an image, a list or a checkpoint is never opened for reading (a
  FIFO would block for ever); :func:`read_regular` opens without blocking and checks the kind on
  the open descriptor, so a file swapped after the check cannot slip through.

A failed write raises :class:`~fastlt.errors.OutputError` naming the path and the cause (a full
disk, a read-only folder, a file size limit) and leaves no temporary file behind.
"""
from __future__ import annotations

import errno
import json
import math
import os
import pickle
import shutil
import stat
import uuid
import zipfile
from pathlib import Path

from fastlt.errors import CheckpointError, DataError, OutputError

__all__ = ["NotRegularFileError", "check_output_file", "check_writable_dir", "damage", "deepspeed_safe_globals",
           "expect_dir", "expect_file", "install_safe_checkpoint_engine", "json_text", "kind_of", "path_problem",
           "read_regular", "safe_load", "torch_save_atomic", "write_failure", "write_text_atomic"]

_REASONS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
            errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
            errno.EPERM: "operation not permitted (read-only or immutable folder)",
            errno.EFBIG: "the file is larger than this process may write (ulimit -f)",
            errno.EISDIR: "it is a directory", errno.ENOTDIR: "a part of the path is a file, not a folder",
            errno.ENOENT: "its folder does not exist"}


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
        reason = _REASONS.get(err.errno, err.strerror or str(err))
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
                          f"({_REASONS.get(err.errno, err.strerror)}); choose a writable folder")


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
        """TorchCheckpointEngine with atomic saves and ``weights_only=True`` loads."""

        def save(self, state_dict, path: str):
            torch_save_atomic(state_dict, path)

        def load(self, path: str, map_location=None):
            return safe_load(path, map_location=map_location)

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise RuntimeError(f"unexpected DeepSpeed checkpoint engine {type(engine.checkpoint_engine).__name__}; "
                           "fastlt expects the default TorchCheckpointEngine (no 'checkpoint' section in the "
                           "DeepSpeed config)")
    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)


# -- what a path is, before it is opened ----------------------------------------------------------

_NAME_MAX = 255  # bytes per path component on ext4, xfs, btrfs, NFS, Lustre and GPFS
_PATH_MAX = 4096  # bytes of a whole path (Linux PATH_MAX)


class NotRegularFileError(OSError):
    """A path that names a FIFO, socket, device or folder where a regular file was expected.

    An OSError, so that the bad-image policy (``data.on_error``) treats such an "image" like any
    other unreadable file."""


def path_problem(path) -> str | None:
    """Why the file system cannot take ``path`` (a NUL, an unpaired surrogate, a name or a path
    over its length limit), or None. Pure text: touches no file."""
    text = os.fspath(path)
    raw = text if isinstance(text, bytes) else None
    if raw is None:
        if "\x00" in text:
            return "it contains a NUL character (\\x00), which no file name can hold"
        try:
            raw = os.fsencode(text)
        except UnicodeEncodeError as e:
            return (f"it contains {text[e.start:e.end]!r} (character {e.start + 1}), which cannot be encoded as a "
                    "file name (an unpaired surrogate: the text was decoded wrongly somewhere)")
    elif b"\x00" in raw:
        return "it contains a NUL byte, which no file name can hold"
    for part in raw.split(b"/"):
        if len(part) > _NAME_MAX:
            return (f"its part {part[:24].decode(errors='replace')!r}... is {len(part)} bytes long; file names are "
                    f"at most {_NAME_MAX} bytes")
    if len(raw) > _PATH_MAX:
        return f"it is {len(raw)} bytes long; paths are at most {_PATH_MAX} bytes"
    return None


def _kind_name(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    return ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
            else "a special file")


def kind_of(path) -> str:
    """What ``path`` names: "file" (regular), "folder", "missing", "a broken link", "a FIFO (named
    pipe)", "a socket", "a character device", ...; for text no path can hold (:func:`path_problem`)
    or a path that cannot be looked at, "not a usable path: <why>"."""
    problem = path_problem(path)
    if problem is not None:
        return f"not a usable path: {problem}"
    try:
        return _kind_name(os.stat(path).st_mode)
    except FileNotFoundError:
        return "a broken link" if os.path.islink(path) else "missing"
    except NotADirectoryError:
        return "missing"
    except OSError as e:
        return f"not a usable path: {_REASONS.get(e.errno, e.strerror or str(e))}"


def _expect(path, want: str, what: str, error, missing: str | None, missing_error=None):
    kind = kind_of(path)
    if kind == want:
        return Path(path)
    if kind == "missing":
        raise (missing_error or error)(missing or f"{what} {os.fspath(path)} does not exist")
    if kind.startswith("not a usable path"):
        raise error(f"{what} {os.fspath(path)!r} is {kind}; fix the name")
    if kind == "a broken link":
        raise error(f"{what} {os.fspath(path)} is a symbolic link to a path that does not exist; fix or remove it")
    expected, fix = (("a regular file", "point it at the file itself") if want == "file"
                     else ("a folder", "point it at the folder"))
    found = {"file": "a regular file", "folder": "a folder"}.get(kind, kind)
    why = "" if kind in ("file", "folder") else " (fastlt never opens FIFOs, sockets or devices: reading one can block)"
    raise error(f"{what} {os.fspath(path)} is {found}, not {expected}; {fix}{why}")


def expect_file(path, what: str, *, error=DataError, missing: str | None = None, missing_error=None) -> Path:
    """``path`` as a Path if it names a regular file; else ``error`` naming ``what`` and what the
    path is instead (``missing``: the message when it does not exist, raised as ``missing_error``
    if given, e.g. FileNotFoundError)."""
    return _expect(path, "file", what, error, missing, missing_error)


def expect_dir(path, what: str, *, error=DataError, missing: str | None = None, missing_error=None) -> Path:
    """``path`` as a Path if it names a folder; else ``error`` as :func:`expect_file`."""
    return _expect(path, "folder", what, error, missing, missing_error)


def read_regular(path) -> bytes:
    """The bytes of the regular file ``path``. Opened without blocking and checked on the open
    descriptor: a FIFO, socket, device or folder raises :class:`NotRegularFileError` (an OSError)
    without being read; a missing file raises FileNotFoundError; text no path can hold raises
    ValueError (:func:`path_problem`)."""
    problem = path_problem(path)
    if problem is not None:
        raise ValueError(f"not a usable path: {problem}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if e.errno == errno.ENXIO:  # a socket (or a FIFO without a writer on some systems)
            raise NotRegularFileError(e.errno, f"{kind_of(path)}, not a regular file", os.fspath(path)) from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(errno.EINVAL, f"{_kind_name(mode)}, not a regular file", os.fspath(path))
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=True) as f:
            fd = -1
            return f.read()
    finally:
        if fd >= 0:
            os.close(fd)
