"""etcd and redis-server from PATH on free loopback ports, their data in a folder, stopped
by PID (never as system services): what ``agentd cluster up``, ``agentd bench cluster`` and
the cluster tests start besides agentd.

Each caller picks its options (Redis's append-only fsync, a session of its own that dies
with its parent, the start timeout); the start, the wait until the port listens and the
stop are here once.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

from agentd.cluster.supervisor import die_with_parent

__all__ = [
    "Backing",
    "BackingError",
    "NotInstalled",
    "free_port",
    "spawn",
    "start_etcd",
    "start_redis",
    "stop_process",
]

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
HOST = "127.0.0.1"


class BackingError(Exception):
    """etcd or Redis could not start; the message is one line."""


class NotInstalled(BackingError):
    """The server's binary is not on PATH; ``binary`` and ``package`` (Debian's) let a
    caller word it its own way."""

    def __init__(self, binary: str, package: str) -> None:
        super().__init__(f"{binary} is not installed (on Debian: apt-get install {package})")
        self.binary, self.package = binary, package


@dataclass(frozen=True, slots=True)
class Backing:
    """A started etcd or Redis; a context manager that stops it on exit."""

    kind: Literal["etcd", "redis"]
    host: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        """The client URL: ``http://`` for etcd, ``redis://host:port/0`` for Redis."""
        if self.kind == "redis":
            return f"redis://{self.host}:{self.port}/0"
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        stop_process(self.process, timeout)

    def __enter__(self) -> Backing:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()


def free_port() -> int:
    """A loopback port the kernel considers free right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def stop_process(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; by this process's own PID only."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def spawn(
    argv: list[str],
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    own_session: bool = False,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` with its output in ``log``. ``own_session``: in a session of its own
    (the terminal's Ctrl-C reaches only the caller, which stops it in order) that gets
    SIGTERM when the caller dies, even by SIGKILL."""
    with log.open("wb") as output:
        return subprocess.Popen(
            argv,
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=own_session,
            preexec_fn=die_with_parent() if own_session else None,
        )


def _binary(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise NotInstalled(name, package)
    return path


def _started(
    kind: Literal["etcd", "redis"],
    argv: list[str],
    port: int,
    folder: Path,
    own_session: bool,
    timeout: float,
) -> Backing:
    log = folder / f"{kind}.log"
    server = Backing(kind, HOST, port, spawn(argv, log, own_session=own_session), log)
    try:
        _wait_listening(server, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_listening(server: Backing, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            lines = server.log.read_text(errors="replace").strip().splitlines()
            last = (lines or ["no output"])[-1][:300]
            raise BackingError(f"{server.kind} exited at start: {last} (log: {server.log})")
        try:
            socket.create_connection((server.host, server.port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise BackingError(
        f"{server.kind} is not listening on {server.host}:{server.port} after {timeout:g}s"
    )


def start_etcd(
    folder: Path,
    *,
    name: str = "agentd",
    own_session: bool = False,
    timeout: float = START_TIMEOUT_S,
) -> Backing:
    """A one-member etcd cluster (Debian's etcd-server) on loopback ports, its data in
    ``folder``/etcd, its log in ``folder``/etcd.log; returned once it listens."""
    binary = _binary("etcd", "etcd-server")
    client, peer = free_port(), free_port()
    argv = [
        binary,
        f"--name={name}",
        f"--data-dir={folder / 'etcd'}",
        f"--listen-client-urls=http://{HOST}:{client}",
        f"--advertise-client-urls=http://{HOST}:{client}",
        f"--listen-peer-urls=http://{HOST}:{peer}",
        f"--initial-advertise-peer-urls=http://{HOST}:{peer}",
        f"--initial-cluster={name}=http://{HOST}:{peer}",
        "--log-level=error",
    ]
    return _started("etcd", argv, client, folder, own_session, timeout)


def start_redis(
    folder: Path,
    *,
    port: int | None = None,
    appendfsync: Literal["always", "everysec"] | None = None,
    own_session: bool = False,
    timeout: float = START_TIMEOUT_S,
) -> Backing:
    """A Redis (Debian's redis-server) on a loopback port (a free one unless ``port`` is
    given: a server started again on the same port and folder reads its append-only file
    back), its data in ``folder``, its log in ``folder``/redis.log. No RDB snapshots.

    ``appendfsync``: None keeps no append-only file; ``"always"`` syncs it on every write
    (a write Redis acknowledged survives ``kill -9``); ``"everysec"`` once a second."""
    binary = _binary("redis-server", "redis-server")
    port = port or free_port()
    argv = [binary, "--port", str(port), "--bind", HOST, "--dir", str(folder), "--save", ""]
    if appendfsync is None:
        argv += ["--appendonly", "no"]
    else:
        argv += ["--appendonly", "yes", "--appendfsync", appendfsync]
    return _started("redis", argv, port, folder, own_session, timeout)
