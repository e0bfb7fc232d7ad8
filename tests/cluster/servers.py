"""Real etcd and Redis servers for the cluster tests (agentd.cluster.backing): started on
free loopback ports in a temporary folder, stopped by PID (never as system services)."""

from __future__ import annotations

from pathlib import Path

from agentd.cluster.backing import Backing, start_etcd, start_redis

Server = Backing


def etcd_server(folder: Path) -> Server:
    """A one-member etcd cluster (Debian's etcd-server) on loopback ports; stops on exit."""
    return start_etcd(folder, name="test")


def redis_server(folder: Path, port: int | None = None) -> Server:
    """A Redis server (Debian's redis-server) on a loopback port (a free one unless
    ``port`` is given), its data in ``folder``; stops on exit.

    Durable as the fault tests need: an append-only file synced on every write
    (``appendfsync always``), so that a write Redis acknowledged survives ``kill -9`` of
    Redis; a server started again on the same port and folder reads it back."""
    return start_redis(folder, port=port, appendfsync="always")
