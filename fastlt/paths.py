"""What a path is, before fastlt opens it.

Every path fastlt reads is checked for what it is first: text the file system cannot take (a
NUL, an unpaired surrogate, a name over its length limit) is refused with one line
(:func:`path_problem`), and a FIFO, socket or device named like an image, a list or a checkpoint
is never opened for reading — a FIFO would block for ever (:func:`kind_of`, :func:`expect_file`,
:func:`expect_dir`). :func:`read_regular` opens without blocking and checks the kind on the open
descriptor, so a file swapped after the check cannot slip through.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from fastlt.errors import REASONS, DataError

__all__ = ["NotRegularFileError", "expect_dir", "expect_file", "kind_of", "path_problem", "read_regular"]


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
        return f"not a usable path: {REASONS.get(e.errno, e.strerror or str(e))}"


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
