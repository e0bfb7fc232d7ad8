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
import subprocess
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import httpx
import redis as syncredis

from agentd.cluster.backing import free_port
from agentd.cluster.etcd import EtcdClient
from agentd.cluster.ownership import plan_owners
from agentd.testing import RunningServer, start_server
from tests.cluster.servers import Server

PLUGINS = Path(__file__).parent.parent / "plugins"
CLUSTER = "faults"
PARTITIONS = 32
TTL_S = 2.0
AGENTS = [f"counter/f{i}" for i in range(24)]
CALL_DEADLINE_MS = 2500


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


def start_node(node_id: str, etcd: Server, redis: Server, ttl: float = TTL_S) -> Node:
    env = {
        "AGENTD_PARTITIONS": str(PARTITIONS),
        "AGENTD_LEASE_TTL_S": str(ttl),
        "AGENTD_STATUS_INTERVAL_S": "0.2",
        "AGENTD_STATE_STORE": "redis",
        "AGENTD_REDIS_URL": redis.url,
    }
    running = start_server(
        [
            *("--plugins", str(PLUGINS), "--etcd", etcd.url, "--cluster", CLUSTER),
            *("--node-id", node_id, "--advertise", f"127.0.0.1:{free_port()}"),
        ],
        env=env,
        timeout=90,
    )
    return Node(node_id, running)


@contextlib.contextmanager
def cluster(
    etcd: Server, redis: Server, count: int = 3, ttl: float = TTL_S
) -> Iterator[list[Node]]:
    nodes: list[Node] = []
    try:
        for i in range(count):
            nodes.append(start_node(f"n{i}", etcd, redis, ttl))
        yield nodes
    finally:
        for node in nodes:
            node.running.stop()


async def owners(etcd: Server) -> dict[int, str]:
    """The partitions' owners as etcd holds them now (waiting for an etcd restarting)."""
    client = EtcdClient(etcd.url)
    try:
        await client.connect(timeout=20)
        items, _ = await client.get_prefix(f"/agentd/{CLUSTER}/partitions/")
    finally:
        await client.aclose()
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


class Failure(NamedTuple):
    started: float  # the call's start and end (monotonic)
    ended: float
    node: str  # the node called
    agent: str
    what: str  # the HTTP status and Connect code, or the transport error


@dataclass
class Calls:
    """What the callers saw: every acknowledged count per agent (with the caller), every
    failure."""

    acked: dict[str, list[tuple[int, int]]] = field(default_factory=lambda: defaultdict(list))
    failed: list[Failure] = field(default_factory=list)

    def total(self) -> int:
        return sum(map(len, self.acked.values()))


async def call_loop(
    caller: int,
    client: httpx.AsyncClient,
    node: Node,
    agents: list[str],
    calls: Calls,
    stop: asyncio.Event,
) -> None:
    """Call ``agents`` in turn through ``node`` until ``stop``; a transport error (the node
    died) ends the loop: a client does not call a dead node again."""
    i = 0
    while not stop.is_set():
        agent = agents[i % len(agents)]
        i += 1
        started = time.monotonic()
        try:
            reply = await client.post(
                f"{node.url}/agentd.v1.AgentService/Invoke",
                json={"agent": agent, "message": {"text": ""}},
                headers={"connect-timeout-ms": str(CALL_DEADLINE_MS)},
                timeout=CALL_DEADLINE_MS / 1000 + 5,
            )
        except httpx.HTTPError as error:
            what = type(error).__name__
            calls.failed.append(Failure(started, time.monotonic(), node.id, agent, what))
            return
        if reply.status_code == 200:
            calls.acked[agent].append((caller, int(reply.json()["message"]["text"])))
        else:
            code = reply.json().get("code", "?")
            what = f"{reply.status_code} {code}"
            calls.failed.append(Failure(started, time.monotonic(), node.id, agent, what))
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def load(nodes: list[Node], calls: Calls, per_node: int = 2) -> AsyncIterator[None]:
    """``per_node`` callers on each node, each over its own connection, all agents."""
    stop = asyncio.Event()
    clients = [httpx.AsyncClient() for _ in range(per_node * len(nodes))]
    tasks = [
        asyncio.create_task(
            call_loop(k, client, nodes[k % len(nodes)], AGENTS[k:] + AGENTS[:k], calls, stop)
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
    """Every acknowledged count is a distinct increment, one caller's counts of an agent
    rise (its calls are one after another), and Redis holds them all: the final count is
    at least every count acknowledged and at most the acknowledged calls plus the failed
    ones (a call that failed may still have committed)."""
    for agent in AGENTS:
        acked = [count for _, count in calls.acked[agent]]
        assert len(set(acked)) == len(acked), (agent, sorted(acked))  # none answered twice
        by_caller = defaultdict(list)
        for caller, count in calls.acked[agent]:
            by_caller[caller].append(count)
        for seen in by_caller.values():
            assert seen == sorted(seen), (agent, seen)
        assert not acked or max(acked) <= counts[agent], (agent, max(acked), counts[agent])
        failed = sum(1 for f in calls.failed if f.agent == agent)
        assert len(acked) <= counts[agent] <= len(acked) + failed, (
            agent,
            len(acked),
            failed,
            counts[agent],
        )


async def check_served_from_persisted(node: Node, counts: dict[str, int]) -> None:
    """Every agent answers through ``node`` with its persisted count plus one."""
    async with httpx.AsyncClient() as client:
        for agent in AGENTS:
            reply = await client.post(
                f"{node.url}/agentd.v1.AgentService/Invoke",
                json={"agent": agent, "message": {"text": ""}},
                timeout=10,
            )
            assert reply.status_code == 200, reply.text
            assert int(reply.json()["message"]["text"]) == counts[agent] + 1, agent


# -- a. kill -9 of one of three nodes under load ---------------------------------------------


async def test_kill_9_of_a_node_under_load(etcd, redis):
    with cluster(etcd, redis) as nodes:
        await wait_owned_by(etcd, {n.id for n in nodes})
        victim = nodes[2]
        calls = Calls()
        async with load(nodes, calls):
            await asyncio.sleep(1.5)
            assert calls.total() > 0, calls.failed
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
        on_victim = [f for f in calls.failed if f.node == victim.id]
        assert len(on_victim) <= 2, on_victim  # one per caller of that node
        assert all(
            f.what in {"ReadError", "RemoteProtocolError", "ConnectError"} for f in on_victim
        )
        forwarded = [f for f in calls.failed if f.node != victim.id]
        assert all(f.what in {"503 unavailable", "504 deadline_exceeded"} for f in forwarded), (
            forwarded
        )
        # None before the kill; none that started after re-homing.
        assert all(f.ended >= killed and f.started <= settled for f in calls.failed), (
            killed,
            settled,
            calls.failed,
        )
        check_nothing_acknowledged_lost(calls, counts)
        # And the survivors serve every agent afterwards, from the persisted counts.
        await check_served_from_persisted(nodes[0], counts)


# -- b. a node stopped (SIGSTOP) past its lease, then woken (SIGCONT) ------------------------


async def wait_planned(etcd: Server, ids: list[str], timeout: float = 30.0) -> float:
    """Wait until the partitions are owned as the plan for ``ids`` deals them."""
    want = dict(enumerate(plan_owners(PARTITIONS, ids)))
    async with asyncio.timeout(timeout):
        while await owners(etcd) != want:
            await asyncio.sleep(0.05)
    return time.monotonic()


async def test_a_node_stopped_past_its_lease_does_not_answer_as_owner(etcd, redis):
    with cluster(etcd, redis) as nodes:
        await wait_planned(etcd, [n.id for n in nodes])
        sleeper = nodes[2]
        theirs = {p for p, owner in (await owners(etcd)).items() if owner == sleeper.id}
        calls = Calls()
        async with load(nodes, calls):
            await asyncio.sleep(1.5)
            os.kill(sleeper.pid, signal.SIGSTOP)
            stopped = time.monotonic()
            try:
                rehomed = await wait_owned_by(etcd, {"n0", "n1"})
                assert rehomed - stopped <= TTL_S + 1.0, rehomed - stopped
                await asyncio.sleep(max(0.0, stopped + TTL_S + 1.5 - time.monotonic()))
            finally:
                os.kill(sleeper.pid, signal.SIGCONT)
            woken = time.monotonic()
            # It registers again and gets its share back by hand-over (draining).
            back = await wait_planned(etcd, [n.id for n in nodes])
            await asyncio.sleep(2.5)
        assert {p for p, o in (await owners(etcd)).items() if o == sleeper.id} == theirs
        counts = persisted(redis)
        # Failures: calls that reached the stopped node or waited on it (their deadline
        # passed, or it refused them after waking: UNAVAILABLE), none once it is back.
        assert all(f.what in {"503 unavailable", "504 deadline_exceeded"} for f in calls.failed), (
            calls.failed
        )
        assert all(f.ended >= stopped and f.started <= back + 0.5 for f in calls.failed), (
            stopped,
            woken,
            back,
            calls.failed,
        )
        assert calls.total() > 0
        check_nothing_acknowledged_lost(calls, counts)
        await check_served_from_persisted(nodes[2], counts)


# -- c. etcd stopped and restarted under real nodes ------------------------------------------


def _restart(etcd: Server) -> subprocess.Popen[bytes]:
    with etcd.log.open("ab") as out:
        return subprocess.Popen(etcd.process.args, stdout=out, stderr=subprocess.STDOUT)


async def test_etcd_stopped_and_restarted_under_real_nodes(etcd, redis):
    """Restarted at once (etcd away for less than the lease: its start takes a second or
    two): the nodes keep serving what they hold (forwarding needs no etcd), no call fails.
    Down past the lease: callers get UNAVAILABLE (no node can be sure of its lease), and
    once etcd is back the nodes register again and serve."""
    ttl = 4.0  # a restarted etcd takes ~2 s to answer here: the short outage must fit
    with cluster(etcd, redis, count=2, ttl=ttl) as nodes:
        await wait_planned(etcd, [n.id for n in nodes])
        calls = Calls()
        restarted: subprocess.Popen[bytes] | None = None
        try:
            async with load(nodes, calls):
                await asyncio.sleep(1.0)
                etcd.process.terminate()
                etcd.process.wait(timeout=10)
                stopped = time.monotonic()
                restarted = _restart(etcd)
                await wait_planned(etcd, [n.id for n in nodes])
                assert time.monotonic() - stopped < ttl
                await asyncio.sleep(1.0)
                assert calls.failed == [], calls.failed
                # Now longer than the lease.
                restarted.terminate()
                restarted.wait(timeout=10)
                stopped = time.monotonic()
                before = calls.total()
                await asyncio.sleep(ttl + 1.5)
                restarted = _restart(etcd)
                await wait_planned(etcd, [n.id for n in nodes])
                back = time.monotonic()
                after = calls.total()
                await asyncio.sleep(2.0)
        finally:
            if restarted is not None:
                restarted.terminate()
                restarted.wait(timeout=10)
        assert calls.failed, (
            "callers saw no failure while etcd was down past the lease",
            (before, after, calls.total(), round(back - stopped, 2)),
            [line for n in nodes for line in n.running.log().splitlines() if "lease" in line],
        )
        assert all(f.what == "503 unavailable" for f in calls.failed), calls.failed
        # Not before the lease could have lapsed; none once etcd answers again.
        outside = [f for f in calls.failed if f.ended < stopped + ttl / 2 or f.started > back + 0.5]
        assert outside == [], (round(back - stopped, 2), outside[-3:], len(outside))
        assert calls.total() > after > before
        check_nothing_acknowledged_lost(calls, persisted(redis))
