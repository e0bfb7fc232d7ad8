"""Supervision of a node's local processes (``agentd serve --processes N`` and ``agentd
swarm --processes N``).

A :class:`Supervisor` watches N children, each with a fixed identity (``p0`` .. ``pN-1``:
its node id, its peer socket and so its partitions): one that exits while serving is
started again with the same identity after a backoff (0.5 s, doubling up to 30 s, back to
0.5 s once it has run for a while), with a log line for the exit and for the restart. The
supervisor knows nothing of Envoy or of the swarm: a child is anything with ``start``,
``poll`` and ``kill`` (:class:`Child`); the caller calls :meth:`Supervisor.check` from the
thread that started the children (see :func:`die_with_parent`).

:func:`local_peers` names the processes and their Unix sockets in a private run folder;
:func:`die_with_parent` makes a child die with the process that started it, so a
supervisor killed with SIGKILL leaves no process behind.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "Child",
    "LocalPeers",
    "Supervisor",
    "die_with_parent",
    "local_peers",
]

_PR_SET_PDEATHSIG = 1
# Looked up once here: the function runs between fork and exec, where little is safe.
_prctl: Any
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn`` for :class:`subprocess.Popen`: the child gets ``sig`` when the
    thread that started it ends (its process killed, even with SIGKILL). Linux only
    (PR_SET_PDEATHSIG); elsewhere it does nothing. The caller must start children from a
    thread that lives as long as they should (the main thread)."""
    parent = os.getpid()

    def preexec() -> None:
        if _prctl is None:
            return
        _prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the call: nothing would come
            os.kill(os.getpid(), sig)

    return preexec


@dataclass(frozen=True, slots=True)
class LocalPeers:
    """The identities of N local processes: ids ``p0``.., each a Unix socket in ``run_dir``
    (a folder only this user can enter). ``peers`` is the settings' form, ``id=endpoint``."""

    run_dir: str
    ids: tuple[str, ...]
    endpoints: tuple[str, ...]

    @property
    def peers(self) -> list[str]:
        return [f"{i}={e}" for i, e in zip(self.ids, self.endpoints, strict=True)]

    def remove(self) -> None:
        """Remove the run folder and the sockets in it."""
        shutil.rmtree(self.run_dir, ignore_errors=True)


def local_peers(count: int, prefix: str = "agentd-run-") -> LocalPeers:
    """A new private run folder (mode 0700) and the identities of ``count`` processes."""
    if count < 1:
        raise ValueError("at least one process")
    folder = tempfile.mkdtemp(prefix=prefix)
    # A Unix socket path is at most 107 bytes: a long TMPDIR would not leave room.
    if len(folder) > 80 and os.path.isdir("/tmp"):
        os.rmdir(folder)
        folder = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    ids = tuple(f"p{i}" for i in range(count))
    return LocalPeers(folder, ids, tuple(f"unix:{folder}/{i}.sock" for i in ids))


class Child(Protocol):
    """One supervised process. ``start`` starts it and returns once it serves (raises when
    it cannot); ``poll`` is its exit status once it has exited, else None; ``kill`` stops
    it at once and reaps it. ``name`` is its identity, ``pid`` its current process."""

    @property
    def name(self) -> str: ...

    @property
    def pid(self) -> int | None: ...

    def start(self) -> None: ...

    def poll(self) -> int | None: ...

    def kill(self) -> None: ...


@dataclass(slots=True)
class _Watch:
    child: Child
    started_at: float
    backoff: float
    restart_at: float | None = None  # set while it waits to be started again
    restarts: int = 0


class Supervisor:
    """Restarts children that exit (see the module's docstring). Not thread-safe: one
    thread calls :meth:`check`, the one that started the children.

    ``log`` gets one line per exit, restart and failed restart. ``stable_s``: a child that
    ran this long before exiting is restarted after ``min_backoff`` again.
    """

    def __init__(
        self,
        children: Sequence[Child],
        *,
        log: Callable[[str], None],
        min_backoff: float = 0.5,
        max_backoff: float = 30.0,
        stable_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log
        self._clock = clock
        self._min = min_backoff
        self._max = max_backoff
        self._stable = stable_s
        now = clock()
        self._watches = [_Watch(child, now, min_backoff) for child in children]

    @property
    def children(self) -> list[Child]:
        return [w.child for w in self._watches]

    def restarts(self, name: str) -> int:
        """How many times the child ``name`` was started again."""
        return next(w.restarts for w in self._watches if w.child.name == name)

    def check(self) -> None:
        """Notice children that exited and start those whose backoff has passed."""
        for watch in self._watches:
            child = watch.child
            now = self._clock()
            if watch.restart_at is None:
                status = child.poll()
                if status is None:
                    continue
                if now - watch.started_at >= self._stable:
                    watch.backoff = self._min
                watch.restart_at = now + watch.backoff
                self._log(
                    f"process {child.name} (pid {child.pid}) exited with {_status(status)};"
                    f" restarting it in {watch.backoff:g}s"
                )
                child.kill()  # reaps it and frees what it held (its admin folder, pipes)
            if watch.restart_at is not None and now >= watch.restart_at:
                self._restart(watch)

    def _restart(self, watch: _Watch) -> None:
        child = watch.child
        try:
            child.start()
        except Exception as exc:  # any failed start: try again later
            child.kill()
            watch.backoff = min(self._max, watch.backoff * 2)
            watch.restart_at = self._clock() + watch.backoff
            self._log(
                f"process {child.name} failed to start again ({exc});"
                f" next try in {watch.backoff:g}s"
            )
            return
        watch.restarts += 1
        watch.restart_at = None
        watch.started_at = self._clock()
        watch.backoff = min(self._max, watch.backoff * 2)
        self._log(f"process {child.name} restarted (pid {child.pid})")


def _status(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"
