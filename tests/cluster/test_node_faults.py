"""Cluster faults with real node processes: ``agentd serve --etcd`` nodes (Envoy with the
node inside) started here on free ports, their state in a real Redis, etcd real too; the
faults are done to the node processes by PID (kill -9, SIGSTOP/SIGCONT) and to etcd.

Clients call a stateful counter (``counter/<id>``: each turn adds one, the reply is the
count) through every node over Connect JSON; every reply is an acknowledged increment, so
what Redis holds at the end must account for each of them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis as syncredis

from agentd.cluster.etcd import EtcdClient
from agentd.testing import RunningServer, start_server
from tests.cluster.servers import Server

PLUGINS = Path(__file__).parent.parent / "plugins"
CLUSTER = "faults"
PARTITIONS = 32
TTL_S = 2.0
AGENTS = [f"counter/f{i}" for i in range(24)]
CALL_DEADLINE_MS = 2500


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Node:
    id: str
    running: RunningServer

    @property
    def url(self) -> str:
        return self.running.url

    @property
    def pid(self) -> int:
        """The node process: the Envoy ``agentd serve`` started (the node runs in it)."""
        return _child_of(self.running.process.pid)


def _child_of(parent: int) -> int:
    with open(f"/proc/{parent}/task/{parent}/children") as children:
        pids = [int(p) for p in children.read().split()]
    assert len(pids) == 1, pids
    return pids[0]


def start_node(node_id: str, etcd: Server, redis: Server) -> Node:
    env = {
        "AGENTD_NODE_ID": node_id,
        "AGENTD_ADVERTISE": f"127.0.0.1:{_free_port()}",
        "AGENTD_CLUSTER": CLUSTER,
        "AGENTD_PARTITIONS": str(PARTITIONS),
        "AGENTD_LEASE_TTL_S": str(TTL_S),
        "AGENTD_STATUS_INTERVAL_S": "0.2",
        "AGENTD_STATE_STORE": "redis",
        "AGENTD_REDIS_URL": redis.redis_url,
    }
    running = start_server(["--plugins", str(PLUGINS), "--etcd", etcd.url], env=env, timeout=90)
    return Node(node_id, running)


@contextlib.contextmanager
def cluster(etcd: Server, redis: Server, count: int = 3) -> Iterator[list[Node]]:
    nodes: list[Node] = []
    try:
        for i in range(count):
            nodes.append(start_node(f"n{i}", etcd, redis))
        yield nodes
    finally:
        for node in nodes:
            node.running.stop()


async def owners(etcd: Server) -> dict[int, str]:
    """The partitions' owners as etcd holds them now."""
    async with EtcdClient(etcd.url) as client:
        items, _ = await client.get_prefix(f"/agentd/{CLUSTER}/partitions/")
    return {int(kv.key.rsplit("/", 1)[1]): kv.value.decode() for kv in items}


async def wait_owned_by(etcd: Server, ids: set[str], timeout: float = 30.0) -> float:
    """Wait until every partition is owned by one of ``ids``; the time it was seen."""
    async with asyncio.timeout(timeout):
        while True:
            held = await owners(etcd)
            if len(held) == PARTITIONS and set(held.values()) <= ids:
                return time.monotonic()
            await asyncio.sleep(0.05)


def persisted(redis: Server) -> dict[str, int]:
    """Each counter's count as Redis holds it."""
    with syncredis.Redis(host=redis.host, port=redis.port) as raw:
        counts = {}
        for agent in AGENTS:
            snapshot = raw.hget("agentd:state:" + agent, "s")
            counts[agent] = 0 if snapshot is None else int(snapshot.split(b":")[1].rstrip(b"}"))
    return counts


@dataclass
class Calls:
    """What the callers saw: every acknowledged count per agent, every failure."""

    acked: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    # (time, node called, agent, what): an HTTP status and Connect code, or a transport error
    failed: list[tuple[float, str, str, str]] = field(default_factory=list)
    ok_after: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def errors_since(self, since: float) -> list[tuple[float, str, str, str]]:
        return [f for f in self.failed if f[0] >= since]


async def call_loop(
    client: httpx.AsyncClient, node: Node, agents: list[str], calls: Calls, stop: asyncio.Event
) -> None:
    """Call ``agents`` in turn through ``node`` until ``stop``; a transport error (the node
    died) ends the loop: a client does not call a dead node again."""
    i = 0
    while not stop.is_set():
        agent = agents[i % len(agents)]
        i += 1
        try:
            reply = await client.post(
                f"{node.url}/agentd.v1.AgentService/Invoke",
                json={"agent": agent, "message": {"text": ""}},
                headers={"connect-timeout-ms": str(CALL_DEADLINE_MS)},
                timeout=CALL_DEADLINE_MS / 1000 + 5,
            )
        except httpx.HTTPError as error:
            calls.failed.append((time.monotonic(), node.id, agent, type(error).__name__))
            return
        if reply.status_code == 200:
            calls.acked[agent].append(int(reply.json()["message"]["text"]))
        else:
            code = reply.json().get("code", "?")
            calls.failed.append((time.monotonic(), node.id, agent, f"{reply.status_code} {code}"))
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def load(nodes: list[Node], calls: Calls, per_node: int = 2) -> AsyncIterator[None]:
    """``per_node`` callers on each node, each over its own connection, all agents."""
    stop = asyncio.Event()
    clients = [httpx.AsyncClient() for _ in range(per_node * len(nodes))]
    tasks = [
        asyncio.create_task(
            call_loop(client, nodes[k % len(nodes)], AGENTS[k:] + AGENTS[:k], calls, stop)
        )
        for k, client in enumerate(clients)
    ]
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait(tasks, timeout=30)
        for client in clients:
            await client.aclose()


def check_nothing_acknowledged_lost(calls: Calls, counts: dict[str, int]) -> None:
    """Every acknowledged count is a distinct increment, and Redis holds them all: the final
    count is at least every count acknowledged and at most the acknowledged calls plus the
    failed ones (a call that failed may still have committed)."""
    for agent in AGENTS:
        acked = calls.acked[agent]
        assert len(set(acked)) == len(acked), (agent, sorted(acked))  # no count answered twice
        assert not acked or max(acked) <= counts[agent], (agent, max(acked), counts[agent])
        failed = sum(1 for f in calls.failed if f[2] == agent)
        assert len(acked) <= counts[agent] <= len(acked) + failed, (
            agent,
            len(acked),
            failed,
            counts[agent],
        )


# -- a. kill -9 of one of three nodes under load ---------------------------------------------


async def test_kill_9_of_a_node_under_load(etcd, redis):
    with cluster(etcd, redis) as nodes:
        await wait_owned_by(etcd, {n.id for n in nodes})
        victim = nodes[2]
        calls = Calls()
        async with load(nodes, calls):
            await asyncio.sleep(1.5)
            assert sum(map(len, calls.acked.values())) > 0, calls.failed
            os.kill(victim.pid, signal.SIGKILL)
            killed = time.monotonic()
            rehomed = await wait_owned_by(etcd, {"n0", "n1"})
            # Lease TTL + 1 s, measured from the kill (its last renewal was before it).
            assert rehomed - killed <= TTL_S + 1.0, rehomed - killed
            settled = time.monotonic() + 0.5  # the survivors' watches bring the new owners
            await asyncio.sleep(2.5)
        counts = persisted(redis)
        # Failures: the calls in flight on the dead node (its callers' connections) and,
        # until re-homing, calls forwarded to it (UNAVAILABLE or DEADLINE); none after.
        on_victim = [f for f in calls.failed if f[1] == victim.id]
        assert len(on_victim) <= 2, on_victim  # one per caller of that node
        assert all(f[3] in {"ReadError", "RemoteProtocolError", "ConnectError"} for f in on_victim)
        forwarded = [f for f in calls.failed if f[1] != victim.id]
        assert all(f[3] in {"503 unavailable", "504 deadline_exceeded"} for f in forwarded), (
            forwarded
        )
        assert all(killed <= f[0] <= settled for f in calls.failed), (killed, settled, calls.failed)
        check_nothing_acknowledged_lost(calls, counts)
        # And the survivors serve every agent afterwards, from the persisted counts.
        async with httpx.AsyncClient() as client:
            for agent in AGENTS:
                reply = await client.post(
                    f"{nodes[0].url}/agentd.v1.AgentService/Invoke",
                    json={"agent": agent, "message": {"text": ""}},
                    timeout=10,
                )
                assert reply.status_code == 200, reply.text
                assert int(reply.json()["message"]["text"]) == counts[agent] + 1
