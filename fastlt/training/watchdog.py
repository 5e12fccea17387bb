"""A rank that dies never hangs the others: heartbeats, a verdict naming the dead rank, a bounded exit.

When one rank of a job is killed (the out-of-memory killer's SIGKILL, a lost node), the others
wait for it inside their next collective: gloo notices a closed socket at once, but NCCL and a
node that vanished without closing its sockets leave them waiting until the process group's
timeout (``run.collective_timeout_s``), and then end with a backend traceback that does not say
which rank was lost. :class:`RankWatch` adds what is needed to say it and to stop in bounded time:

* every rank runs a daemon thread that increments its heartbeat counter in a small TCP store
  served by rank 0's process (not the rendezvous store, which belongs to the launcher);
* rank 0 watches every counter; the others watch the store (and so rank 0) and a ``verdict`` key;
* a rank whose counter stops for ``dead_after`` = min(60 s, collective timeout) without having
  marked a clean exit is dead; a rank that marked ``failed`` (it raised) stops the others after a
  short grace, in which ranks that raise together (a non-finite loss, a stop signal) exit by themselves;
* when a collective fails (the main thread's evidence), :meth:`RankWatch.verdict` decides within
  a few heartbeats which rank is gone, and the trainer raises one :class:`RankLostError` line naming
  it and the latest checkpoint (printed by the lowest surviving rank only);
* when no collective fails (the main thread blocked in NCCL), the thread itself prints that line
  and ends the process with exit code 4.

The run directory is never damaged by this: checkpoints are published by atomic renames
(``fastlt.training.checkpoint``), so ``--resume auto`` continues from the latest complete one.
Cost: one store operation per rank per heartbeat (every dead_after / 12 s), plus one per rank on rank 0.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from datetime import timedelta

from fastlt.errors import FastltError, RankLostError

__all__ = ["RankWatch", "rank_lost_error"]

#: The exit code of a rank ended by the watchdog thread (``RankLostError``'s).
EXIT_CODE = 4


class _BoundedStore:
    """A TCPStore whose calls give up after ``timeout`` seconds: the client's own timeout does not
    cover a server that stopped answering on an open connection (a frozen rank 0), whose calls
    would otherwise block for ever. Each call runs on a daemon thread; one that hangs is left behind."""

    def __init__(self, store, timeout: float):
        self._store, self._timeout = store, timeout

    def __getattr__(self, name):
        method = getattr(self._store, name)

        def call(*args):
            out: list = []

            def run():
                try:
                    out.append((True, method(*args)))
                except Exception as e:  # handed to the caller
                    out.append((False, e))

            t = threading.Thread(target=run, name="fastlt-store-call", daemon=True)
            t.start()
            t.join(self._timeout)
            if not out:
                raise TimeoutError(f"the rank-watch store did not answer {name} within {self._timeout:.0f} s")
            ok, value = out[0]
            if not ok:
                raise value
            return value

        return call


class RankWatch:
    """Heartbeats of every rank of a job and the verdict on a lost one (see the module docstring)."""

    def __init__(self, rank: int, world_size: int, timeout_s: float, latest=None):
        self.rank, self.world = rank, world_size
        self.latest = latest  # a callable: the latest complete checkpoint (or None), for the message
        self.dead_after = min(60.0, float(timeout_s))
        self.interval = self.dead_after / 12
        self.store = None
        self.peers: list = []
        self._stop = threading.Event()
        self._acted = threading.Lock()
        self._thread: threading.Thread | None = None
        self._seen: dict[int, tuple[int, float]] = {}
        self._failed_since: dict[int, float] = {}
        self._store_down_since: float | None = None

    # -- life ----------------------------------------------------------------------------

    def start(self) -> "RankWatch":
        """Collective (every rank, after the process group is up): rank 0 serves the store, all connect."""
        import torch.distributed as tdist

        if self.world == 1:
            return self
        # A healthy store answers in milliseconds: a short timeout keeps a frozen rank 0 from
        # holding every store call (and so the verdict) for long.
        timeout = timedelta(seconds=max(2.0, 3 * self.interval))
        server = None
        if self.rank == 0:
            server = tdist.TCPStore("0.0.0.0", 0, None, True, timeout, wait_for_workers=False)
        me = (socket.gethostname(), os.getpid(), server.port if server is not None else 0)
        self.peers = [None] * self.world
        tdist.all_gather_object(self.peers, me)
        host, port = self.peers[0][0], self.peers[0][2]
        if server is not None:
            self.store = server
        else:
            addr = "127.0.0.1" if host == me[0] else host
            try:
                self.store = tdist.TCPStore(addr, port, None, False, timeout, wait_for_workers=False)
            except (RuntimeError, OSError):  # rank 0's host name does not resolve here: its rendezvous address
                self.store = tdist.TCPStore(os.environ.get("MASTER_ADDR", host), port, None, False, timeout,
                                            wait_for_workers=False)
        self.store = _BoundedStore(self.store, timeout.total_seconds())
        self.store.add(f"beat/{self.rank}", 1)
        tdist.barrier()  # every counter exists before rank 0 first reads them
        now = time.monotonic()
        self._seen = {r: (0, now) for r in range(self.world)}
        self._thread = threading.Thread(target=self._run, name="fastlt-rank-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self, status: str) -> None:
        """Mark this rank's exit (``done`` or ``failed``) so the others do not take it for dead, and
        stop the thread; idempotent."""
        if self.store is None or self._stop.is_set():
            return
        self._stop.set()
        if self._store_down_since is not None:  # rank 0 (the store) is gone: nobody is left to tell
            return
        try:
            self.store.set(f"exit/{self.rank}", status)
        except Exception:  # rank 0 (the store) already gone: nobody is left to tell
            pass

    # -- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                verdict = self._beat_and_look()
                self._store_down_since = None
            except Exception:
                if self.rank == 0:  # its own store: nothing to conclude
                    continue
                now = time.monotonic()
                self._store_down_since = self._store_down_since or now
                # Unreachable for dead_after: rank 0, which serves it, is dead or its node lost.
                verdict = {"dead": [0], "failed": []} if now - self._store_down_since >= self.dead_after else None
            if verdict and not self._stop.is_set() and self._act(verdict):
                return

    def _beat_and_look(self) -> dict | None:
        store = self.store
        store.add(f"beat/{self.rank}", 1)
        if self.rank != 0:
            return json.loads(store.get("verdict")) if store.check(["verdict"]) else None
        verdict = self._judge(patience=self.dead_after, grace=self.dead_after / 2)
        if verdict:
            store.set("verdict", json.dumps(verdict))
        return verdict

    def _judge(self, patience: float, grace: float) -> dict | None:
        """Rank 0: ranks whose counter has not moved for ``patience`` seconds and that did not exit
        cleanly (dead), and ranks that marked a failure at least ``grace`` seconds ago (failed)."""
        store, now = self.store, time.monotonic()
        others = [r for r in range(self.world) if r != self.rank]
        beats = store.multi_get([f"beat/{r}" for r in others])
        exits = {r: store.get(f"exit/{r}").decode() for r in others if store.check([f"exit/{r}"])}
        dead, failed = [], []
        for r, b in zip(others, beats):
            count = int(b)
            last, since = self._seen.get(r, (count, now))
            if count != last:
                self._seen[r] = (count, now)
                since = now
            if exits.get(r) == "done":
                continue
            if exits.get(r) == "failed":
                first = self._failed_since.setdefault(r, now)
                if now - first >= grace:
                    failed.append(r)
            elif (here := self._local_state(r)) == "gone" or (now - since >= patience and here != "running"):
                dead.append(r)
        return {"dead": dead, "failed": failed} if dead or failed else None

    def _local_state(self, r: int) -> str:
        """``gone`` (its process exited: certain at once), ``stopped`` (SIGSTOP: as good as a lost
        node), ``running`` (a silent heartbeat is only a slow thread) or ``remote`` (another host)."""
        host, pid, _ = self.peers[r]
        if host != socket.gethostname():
            return "remote"
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "gone"
        except PermissionError:
            return "running"
        state = _state(pid)
        return "gone" if state in ("Z", "X", "?") else "stopped" if state in ("T", "t") else "running"

    def _act(self, verdict: dict) -> bool:
        """The thread's way out, when the main thread is still waiting in a collective (False: the
        main thread is deciding already)."""
        if not self._acted.acquire(blocking=False):
            return False
        err = self.error(verdict)
        if err.report:
            print(f"fastlt: error: {err}", file=sys.stderr, flush=True)
        os._exit(EXIT_CODE)

    # -- the main thread's verdict -------------------------------------------------------

    def verdict(self) -> dict | None:
        """After a collective failed: which rank is gone, decided within a few heartbeats (None: no
        rank is; the failure is something else). The watchdog thread stands down meanwhile."""
        if self.store is None or not self._acted.acquire(blocking=False):
            return None
        window = max(3 * self.interval, 5.0)
        deadline = time.monotonic() + 2 * window
        while time.monotonic() < deadline:
            try:
                if self.rank == 0:
                    found = self._judge(patience=window, grace=0.0)
                    if found:
                        self.store.set("verdict", json.dumps(found))
                        return found
                elif self.store.check(["verdict"]):
                    return json.loads(self.store.get("verdict"))
                self.store.add(f"beat/{self.rank}", 1)
            except Exception:  # rank 0 serves the store, and a collective failed too: it is gone
                self._store_down_since = time.monotonic()
                return {"dead": [0], "failed": []}
            time.sleep(self.interval / 2)
        return None

    def error(self, verdict: dict) -> RankLostError:
        """The one line for ``verdict``; reported by rank 0, or by rank 1 when rank 0 is the one lost."""
        try:
            latest = self.latest() if self.latest is not None else None
        except (FastltError, OSError):
            latest = None
        gone = verdict["dead"] + verdict["failed"]
        desc = []
        for r in verdict["dead"]:
            host, pid, _ = self.peers[r]
            desc.append(f"rank {r} (pid {pid} on {host}) died: killed (e.g. by the out-of-memory killer) or its "
                        "node was lost")
        for r in verdict["failed"]:
            host, pid, _ = self.peers[r]
            desc.append(f"rank {r} (pid {pid} on {host}) stopped with an error (its own output says which)")
        where = (f"The latest checkpoint is {latest}, complete and untouched: continue with --resume auto (on this "
                 "or another number of ranks)" if latest is not None else
                 "The run's checkpoints are complete and untouched: continue with --resume auto")
        reporter = 1 if 0 in gone else 0
        return RankLostError(f"{'; '.join(desc)}; the other {self.world - len(gone)} rank(s) of the job stopped. "
                             f"{where}", report=self.rank == reporter)


def _state(pid: int) -> str:
    """The process state letter of /proc/PID/stat (``?`` once it is gone; ``S`` where there is no /proc)."""
    if not os.path.isdir("/proc/self"):
        return "S"
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "?"


def rank_lost_error(watch: RankWatch | None, err: BaseException) -> RankLostError | None:
    """The :class:`RankLostError` to raise instead of ``err`` (a failed collective) when a rank of the
    job is gone, else None."""
    if watch is None or watch.store is None or isinstance(err, FastltError):
        return None
    verdict = watch.verdict()
    return None if verdict is None else watch.error(verdict)
