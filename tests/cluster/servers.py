"""Real etcd and Redis servers for the cluster tests: started on free loopback ports in a
temporary folder, stopped by PID (never as system services)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class Server:
    host: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def redis_url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _binary(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed: apt-get install {package} (make test does)")
    return path


def _wait_listening(server: Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.log.name} exited: {server.log.read_text()[-2000:]}")
        try:
            socket.create_connection((server.host, server.port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(
        f"not listening after {START_TIMEOUT_S:g}s: {server.log.read_text()[-2000:]}"
    )


@contextmanager
def _running(argv: list[str], port: int, log: Path) -> Iterator[Server]:
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    server = Server("127.0.0.1", port, process, log)
    try:
        _wait_listening(server)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def etcd_server(folder: Path) -> Iterator[Server]:
    """A one-member etcd cluster (Debian's etcd-server) on loopback ports."""
    client, peer = _free_port(), _free_port()
    argv = [
        _binary("etcd", "etcd-server"),
        "--name=test",
        f"--data-dir={folder / 'etcd'}",
        f"--listen-client-urls=http://127.0.0.1:{client}",
        f"--advertise-client-urls=http://127.0.0.1:{client}",
        f"--listen-peer-urls=http://127.0.0.1:{peer}",
        f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
        f"--initial-cluster=test=http://127.0.0.1:{peer}",
        "--log-level=error",
    ]
    with _running(argv, client, folder / "etcd.log") as server:
        yield server


@contextmanager
def redis_server(folder: Path, port: int | None = None) -> Iterator[Server]:
    """A Redis server (Debian's redis-server) on a loopback port (a free one unless
    ``port`` is given), its data in ``folder``.

    Durable as the fault tests need: an append-only file synced on every write
    (``appendonly yes``, ``appendfsync always``), so that a write Redis acknowledged
    survives ``kill -9`` of Redis; a server started again on the same port and folder
    reads it back. No RDB snapshots (``save ""``)."""
    port = port or _free_port()
    argv = [
        _binary("redis-server", "redis-server"),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(folder),
        "--save",
        "",
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
    ]
    with _running(argv, port, folder / "redis.log") as server:
        yield server
