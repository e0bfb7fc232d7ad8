"""Faults with real etcd and nodes in this process: bad data under the prefix, a node that
dies without leaving (its lease expires), etcd stopped and restarted, a node stalled past
its lease."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time

import pytest

from agentd.cluster.etcd import EtcdClient
from agentd.cluster.placement import partition_of
from agentd.errors import Unavailable
from tests.cluster.etcd_nodes import PARTITIONS, addresses, converged, etcd_node, membership

GARBAGE = {
    "/agentd/test/nodes/x": b"{not json",
    "/agentd/test/nodes/y": b"[1, 2]",
    "/agentd/test/nodes/z": b'{"id": "other", "peer": "tcp:1.2.3.4:5", "zone": "z", "lease": 1}',
    "/agentd/test/nodes/w": b'{"id": "w", "peer": 7, "zone": "z", "lease": 1}',
    "/agentd/test/partitions/100000": b"a",
    "/agentd/test/partitions/abc": b"a",
    "/agentd/test/partitions/-1": b"a",
    "/agentd/test/scale/zone/failover": b'{"down": "z1"}',
    "/agentd/test/what/is/this": b"\xff\xfe",
    "/agentd/test/\xff": b"",
}


async def test_bad_data_in_etcd_is_logged_and_ignored(tmp_path, etcd, caplog):
    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(etcd_node(tmp_path, etcd.url, "a"))
        async with EtcdClient(etcd.url) as client:
            for key, value in GARBAGE.items():
                await client.put(key, value)
            b = await stack.enter_async_context(etcd_node(tmp_path, etcd.url, "b"))
            owners = await converged([a, b])
            assert set(owners) == {"a", "b"}
            assert set(membership(a).nodes) == {"a", "b"}
            assert membership(a).down_zones == frozenset()
            # more garbage while running, then a good change is still seen
            await client.put("/agentd/test/nodes/q", b"\x00\x01")
            await client.put("/agentd/test/scale/zone/failover", b'{"down": ["nowhere"]}')
            async with asyncio.timeout(10):
                while membership(b).down_zones != {"nowhere"}:
                    await asyncio.sleep(0.05)
        for address in addresses(10):
            assert await a.runtime.host.ask(address, 0) >= 1
    assert "ignored bad etcd data" in caplog.text


def _crash(node) -> None:
    """The node stops dead as far as etcd knows: no renewal, no revoke, no hand-over."""
    m = membership(node)
    for task in m._tasks:
        task.cancel()
    if m._fence_timer is not None:
        m._fence_timer.cancel()


async def test_a_dead_nodes_partitions_move_to_survivors_within_ttl_plus_one_second(tmp_path, etcd):
    async with contextlib.AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(etcd_node(tmp_path, etcd.url, n)) for n in "abc"]
        await converged(nodes)
        c = membership(nodes[2])
        _crash(nodes[2])
        await asyncio.sleep(0)
        last_renewal = c._renewed_at
        a, b = membership(nodes[0]), membership(nodes[1])
        async with asyncio.timeout(10):
            while any(o not in ("a", "b") for o in a.owners) or a.owners != b.owners:
                await asyncio.sleep(0.01)
        rehomed = time.monotonic() - last_renewal
        assert rehomed <= a._ttl + 1.0, rehomed
        await converged(nodes[:2])
        for address in addresses(20):
            assert await nodes[0].runtime.host.ask(address, 0) >= 1


def _restart(etcd) -> subprocess.Popen[bytes]:
    with etcd.log.open("ab") as out:
        return subprocess.Popen(etcd.process.args, stdout=out, stderr=subprocess.STDOUT)


@pytest.mark.parametrize("down_s", [0.8, 3.5])
async def test_etcd_stopped_and_restarted(tmp_path, etcd, down_s):
    """Down for less than the TTL: the nodes keep serving what they hold. Down for longer:
    they stop answering as owners (callers get UNAVAILABLE) and serve again once etcd
    answers (their leases held across its restart, or new ones)."""
    async with contextlib.AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(etcd_node(tmp_path, etcd.url, n)) for n in "ab"]
        owners = await converged(nodes)
        targets = addresses(20)
        for address in targets:
            await nodes[0].runtime.host.ask(address, 0)
        etcd.process.terminate()
        etcd.process.wait(timeout=10)
        restarted = None
        try:
            stopped = time.monotonic()
            await asyncio.sleep(down_s)
            outcomes = []
            for address in targets:
                try:
                    await nodes[0].runtime.host.ask(address, 0, timeout=5)
                    outcomes.append("ok")
                except Unavailable:
                    outcomes.append("unavailable")
            if down_s < membership(nodes[0])._ttl:
                assert time.monotonic() - stopped < membership(nodes[0])._ttl
                assert outcomes == ["ok"] * len(targets)
            else:
                assert outcomes == ["unavailable"] * len(targets)
                for node in nodes:
                    assert node.runtime.host.gauges()["active_agents"] == 0
            restarted = _restart(etcd)
            assert await converged(nodes, timeout=30) == owners
            for address in targets:
                assert await nodes[1].runtime.host.ask(address, 0) >= 2
        finally:
            if restarted is not None:
                restarted.terminate()
                restarted.wait(timeout=10)


async def test_a_node_stalled_past_its_lease_does_not_answer_as_owner(tmp_path, etcd):
    async with etcd_node(tmp_path, etcd.url, "a") as a:
        m = membership(a)
        await converged([a])
        address = addresses(1)[0]
        assert await a.runtime.host.ask(address, 0) == 1  # active here now
        assert m.owners[partition_of(address, PARTITIONS)] == "a"
        time.sleep(m._ttl + 1.0)  # noqa: ASYNC251  # the process stalls: no renewal, no loop
        # The first request after the stall arrives as new input does (a task).
        call = asyncio.create_task(a.runtime.host.ask(address, 0, timeout=5))
        with pytest.raises(Unavailable, match="retry"):
            await call
        assert a.runtime.host.gauges()["active_agents"] == 0
        # It registers again (a new lease) and serves, its state intact.
        async with asyncio.timeout(20):
            while True:
                try:
                    assert await a.runtime.host.ask(address, 0) == 2
                    break
                except Unavailable:
                    await asyncio.sleep(0.1)


async def test_a_fence_timer_firing_early_still_fences_at_the_leases_end(tmp_path, etcd):
    """uvloop's timers have millisecond resolution and can fire a little before their time
    (the real nodes run on uvloop): the node must still stop answering as owner once its
    lease may have lapsed, also for agents active here (before: the early call found the
    lease still valid and nothing looked again; the node kept serving them)."""
    async with etcd_node(tmp_path, etcd.url, "a") as a:
        m = membership(a)
        await converged([a])
        address = addresses(1)[0]
        assert await a.runtime.host.ask(address, 0) == 1  # active here now
        _crash(a)  # no renewals from now on, and the timer is ours to fire
        async with asyncio.timeout(10):
            while m._clock() < m.gate.valid_until - 0.002:
                await asyncio.sleep(0.001)
        m._lease_may_have_lapsed()  # the timer, two milliseconds early
        assert not m.gate._fenced  # the lease is still valid: not yet
        await asyncio.sleep(0.05)
        with pytest.raises(Unavailable, match="retry"):
            await a.runtime.host.ask(address, 0, timeout=5)
        assert a.runtime.host.gauges()["active_agents"] == 0


async def test_a_tell_arriving_with_the_wake_of_a_stall_runs_no_turn(tmp_path, etcd):
    """Input waiting when a stalled loop wakes is handled in the same loop step as the
    fence timer, before it: a tell delivered synchronously there (a peer's batch of
    tells arrives so) to an agent active here reaches its mailbox, but the timer drops
    the activation before a worker can start the turn."""
    async with etcd_node(tmp_path, etcd.url, "a") as a:
        m = membership(a)
        await converged([a])
        host = a.runtime.host
        address = addresses(1)[0]
        assert await host.ask(address, 0) == 1
        turns = host.turns
        reader, writer = socket.socketpair()
        loop = asyncio.get_running_loop()
        delivered: list[bool] = []

        def on_input() -> None:
            reader.recv(16)
            delivered.append(host.tell_nowait(address, 0))

        loop.add_reader(reader.fileno(), on_input)
        try:
            writer.send(b"x")
            time.sleep(m._ttl + 0.5)  # noqa: ASYNC251  # the stall; the input waits for the wake
            await asyncio.sleep(0.2)
        finally:
            loop.remove_reader(reader.fileno())
            reader.close()
            writer.close()
        assert delivered == [True]  # into the mailbox of the activation still there
        assert host.turns == turns  # but no turn ran
        assert host.gauges()["active_agents"] == 0
