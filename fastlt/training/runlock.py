"""One process at a time in a run directory: an exclusive lock held for the run's whole life.

:class:`RunLock` takes ``flock(LOCK_EX | LOCK_NB)`` on ``<run_dir>/.fastlt.lock`` and writes the
holder into it (host, pid, start time, command). A second ``fastlt train`` into the same
directory, a ``fastlt eval`` / ``fastlt inspect`` writing its report there, or a second
``fastlt profile`` then stops at once with one line naming that holder, before it reads or
writes anything else.

Why flock on a file in the run directory:

* the kernel drops the lock when the holding process dies in any way (SIGKILL and the
  out-of-memory killer included), so there is never a stale lock to clean up by hand: a
  leftover ``.fastlt.lock`` file without a live holder is simply taken over;
* it conflicts between any two open files, also inside one process (two ``Trainer`` objects);
* shared file systems: on NFS (v3 with lockd, v4) the Linux client implements flock as a
  whole-file POSIX lock that the server arbitrates, so the lock holds across nodes; GPFS and
  BeeGFS support it; Lustre only when mounted with ``-o flock`` (``-o localflock`` locks per
  node only). Where the file system refuses locks (ENOLCK, EOPNOTSUPP, ENOSYS: an NFS mount
  with ``nolock``, Lustre without ``flock``) the run stops and says so; ``run.lock: false``
  then runs without the lock, and keeping two processes out of one directory is the user's job.

Only global rank 0 takes the lock (the other ranks of a job share the directory with it).
The file is removed when the lock is released normally; it never holds anything but the
holder line, so a refused command leaves the run directory as it was.
"""
from __future__ import annotations

import errno
import fcntl
import os
import stat
import socket
import time
from pathlib import Path

from fastlt.errors import OutputError

__all__ = ["LOCK_FILE", "RunLock"]

LOCK_FILE = ".fastlt.lock"
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _holder_line(command: str) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())
    return f"host {socket.gethostname()}, pid {os.getpid()}, started {started} ({command})\n"


class RunLock:
    """The exclusive lock of one run directory (see the module docstring). ``acquire`` raises
    OutputError naming the holder; ``release`` (also on ``with`` exit) gives it back."""

    def __init__(self, run_dir: str | os.PathLike, command: str = "fastlt train",
                 fix: str = "choose another run.name / run.output_dir"):
        self.run_dir = Path(run_dir)
        self.fix = fix
        self.path = self.run_dir / LOCK_FILE
        self.command = command
        self._fd: int | None = None
        self._created: list[Path] = []

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        """Take the lock, creating the run directory if needed (removed again on release if it
        is then empty). Raises OutputError if another process holds it or locks are unsupported."""
        if self._fd is not None:
            return self
        if not self.run_dir.exists():
            missing = [self.run_dir]  # the folders this lock creates, deepest first (removed again on refusal)
            while not missing[-1].parent.exists() and missing[-1].parent != missing[-1]:
                missing.append(missing[-1].parent)
            try:
                self.run_dir.mkdir(parents=True)
                self._created = missing
            except FileExistsError:
                pass
            except OSError as e:
                raise OutputError(f"cannot create the run directory {self.run_dir}: {e.strerror}; choose a "
                                  "writable run.output_dir") from None
        while True:  # the file may be unlinked by its releasing holder between our open and flock
            try:
                try:
                    fd, created = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644), True
                except FileExistsError:
                    # never through a symlink, never blocking: a leftover lock file is truncated
                    # and rewritten, so it must be this folder's own regular file
                    fd, created = os.open(self.path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK), False
            except FileNotFoundError:
                continue  # removed between the two opens by its releasing holder
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise OutputError(f"{self.path} is a symbolic link; fastlt writes its lock file and never "
                                      "writes through a link (it could overwrite what it points to): remove "
                                      "the link") from None
                raise OutputError(f"cannot create the lock file {self.path}: {e.strerror}; the run directory "
                                  "must be writable") from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise OutputError(f"{self.path} is not a regular file (a FIFO, socket or device); fastlt keeps its "
                                  "lock in a regular file of that name: remove it")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise OutputError(self._busy_message()) from None
                if e.errno in _UNSUPPORTED:
                    if created:
                        os.unlink(self.path)
                    self._drop_created()
                    raise OutputError(
                        f"cannot lock the run directory {self.run_dir}: its file system does not support file "
                        f"locks ({os.strerror(e.errno)}; e.g. NFS mounted with nolock, Lustre without -o flock), "
                        "so fastlt cannot keep a second process out of it. Use a run.output_dir on a file system "
                        "with locks, or --set run.lock=false and make sure only one process uses the directory"
                    ) from None
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # we locked a file its holder had just removed: take the new one
        os.ftruncate(fd, 0)
        os.write(fd, _holder_line(self.command).encode())
        self._fd = fd
        return self

    def _busy_message(self) -> str:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                holder = f.read(512).strip()
        except OSError:
            holder = ""
        who = holder or "a process that is still starting (it has not written its name yet)"
        return (f"run directory {self.run_dir} is in use by another fastlt process: {who}. Wait for it to finish "
                f"(or stop it), or {self.fix}")

    def _drop_created(self) -> None:
        for folder in self._created:
            try:
                folder.rmdir()  # only if still empty
            except OSError:
                break
        self._created = []

    def release(self, *, remove_empty_dir: bool = False) -> None:
        """Give the lock back: remove the lock file (while still holding it, so no one locks a
        file about to vanish), then close. ``remove_empty_dir``: also remove the run directory
        this lock created (and the folders it created above it) while still empty (a refused
        run leaves no trace)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        if remove_empty_dir:
            self._drop_created()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False
