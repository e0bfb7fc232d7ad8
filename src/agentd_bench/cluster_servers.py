"""What ``agentd bench cluster`` starts besides agentd: etcd and Redis from PATH on free
loopback ports with their data in a temporary folder (agentd.cluster.backing: stopped by
PID, never as services), and the CPU time of a server's process tree read from /proc."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

from agentd.cluster.backing import Backing, BackingError, NotInstalled, start_etcd, start_redis
from agentd_bench.errors import BenchError
from agentd_bench.servers import descendants

__all__ = [
    "Skipped",
    "cpu_seconds",
    "etcd_server",
    "redis_integer",
    "redis_server",
    "tree_rss_mb",
]


class Skipped(BenchError):
    """A section cannot run on this machine (a binary or a feature is missing); the
    message says why and goes into the JSON instead of the section's figures."""


START_TIMEOUT_S = 30.0


def _started(start: Callable[[], Backing]) -> Backing:
    try:
        return start()
    except NotInstalled as error:
        raise Skipped(
            f"{error.binary} not found on PATH (apt-get install {error.package})"
        ) from None
    except BackingError as error:
        raise BenchError(str(error)) from None


def etcd_server(folder: Path) -> Backing:
    """A one-member etcd on loopback ports, its data in ``folder``; stops on exit."""
    return _started(lambda: start_etcd(folder, name="bench", timeout=START_TIMEOUT_S))


def redis_server(folder: Path) -> Backing:
    """A Redis on a loopback port, its data in ``folder``: append-only, fsync every
    second (Redis's own default for AOF; a store's writes are acknowledged by Redis);
    stops on exit."""
    return _started(lambda: start_redis(folder, appendfsync="everysec", timeout=START_TIMEOUT_S))


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and every process below it (all their threads), from
    /proc; processes that end in between are not counted."""
    total = 0
    for each in (pid, *descendants(pid)):
        try:
            stat = Path(f"/proc/{each}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / _TICKS


_PAGE = os.sysconf("SC_PAGE_SIZE")


def tree_rss_mb(pid: int) -> float:
    """The resident memory of ``pid`` and every process below it, summed, in MB."""
    total = 0
    for each in (pid, *descendants(pid)):
        try:
            total += int(Path(f"/proc/{each}/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total * _PAGE / 2**20


def redis_integer(url: str, *command: str) -> int:
    """Send one command to the Redis at ``url`` (``redis://host:port/db``) and return its
    integer reply (DBSIZE), or 0 for a simple-string reply (FLUSHDB's OK). Plain RESP over
    a socket: the bench needs two commands, not a client library."""
    where = url.removeprefix("redis://").split("/", 1)
    host, port = where[0].rsplit(":", 1)
    db = where[1] if len(where) > 1 and where[1] else "0"
    request = b""
    for words in (["SELECT", db], list(command)):
        request += f"*{len(words)}\r\n".encode()
        for word in words:
            request += f"${len(word.encode())}\r\n{word}\r\n".encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while received.count(b"\r\n") < 2:
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
    lines = received.split(b"\r\n")
    if len(lines) < 2 or lines[0] != b"+OK" or lines[1][:1] not in (b":", b"+"):
        raise BenchError(f"Redis at {url} answered {received[:200]!r} to {command}")
    return int(lines[1][1:]) if lines[1][:1] == b":" else 0
