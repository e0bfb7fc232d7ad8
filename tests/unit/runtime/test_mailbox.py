"""Mailboxes: the first waiting message sits in a slot, more in a deque; order and bounds
hold across both, and tells and asks to one agent run in the order they arrived."""

from __future__ import annotations

import asyncio

import pytest

from agentd import Agent
from agentd.agents import AgentRegistry
from agentd.errors import NotFound, ResourceExhausted
from agentd.runtime import ActorHost, MemoryStateStore, WorkerPool
from agentd.runtime.activation import Phase
from agentd.swarm.host import SwarmHost


class Log(Agent):
    name = "log"

    async def handle(self, ctx, message):
        await asyncio.sleep(0)  # let more messages arrive while this turn runs
        ctx.state.setdefault("seen", []).append(message)
        return len(ctx.state["seen"])


@pytest.fixture
async def host():
    registry = AgentRegistry()
    registry.register(Log)
    host = ActorHost(registry, MemoryStateStore(), pool=WorkerPool(4, 8), max_mailbox=5)
    await host.start()
    yield host
    await host.aclose()


@pytest.fixture
async def swarm_host():
    registry = AgentRegistry()
    registry.register(Log)
    host = SwarmHost(registry, MemoryStateStore(), pool=WorkerPool(4, 8), max_mailbox=5)
    await host.start()
    yield host
    await host.aclose()


async def _idle(host: ActorHost) -> None:
    while host.gauges()["messages_waiting"] or host.pool.statistics().busy:
        await asyncio.sleep(0.001)


async def test_tells_and_asks_run_in_arrival_order(host):
    assert host.tell_nowait("log/a", 0)  # the slot
    assert host.tell_nowait("log/a", 1)  # the deque from here on
    asked = asyncio.ensure_future(host.ask("log/a", 2))
    await asyncio.sleep(0)
    assert host.tell_nowait("log/a", 3)
    assert await asked == 3
    await _idle(host)
    assert host.tell_nowait("log/a", 4)  # idle again: the slot again
    await _idle(host)
    assert host.instance("log/a") is not None
    activation = host._activations[host._activation("log/a").address]
    assert activation.state == {"seen": [0, 1, 2, 3, 4]}
    assert activation.mailbox is None and activation.waiting() == 0


async def test_a_full_mailbox_refuses_and_keeps_what_it_has(host):
    for i in range(5):
        assert host.tell_nowait("log/b", i)
    with pytest.raises(ResourceExhausted, match="5 messages waiting"):
        host.tell_nowait("log/b", 5)
    assert host.gauges()["messages_waiting"] == 5
    await _idle(host)
    activation = host._activations[host._activation("log/b").address]
    assert activation.state == {"seen": [0, 1, 2, 3, 4]}


def test_a_full_run_queue_delivers_nothing():
    registry = AgentRegistry()
    registry.register(Log)
    # Not started: queued agents stay queued.
    host = ActorHost(registry, MemoryStateStore(), pool=WorkerPool(1, 3))
    for i in range(3):
        assert host.tell_nowait(f"log/q{i}", i)
    assert host.tell_nowait("log/q0", "again")  # already queued: needs no new place
    assert not host.tell_nowait("log/late", 0)
    late = host._activations[host._activation("log/late").address]
    assert late.waiting() == 0 and late.phase is Phase.IDLE
    assert host.gauges()["messages_waiting"] == 4


async def test_told_turns_are_reported_one_in_observe_every():
    class Recorder:
        def __init__(self):
            self.turns = []

        def turn_finished(self, agent_type, outcome, seconds):
            self.turns.append((agent_type, outcome, seconds))

    registry = AgentRegistry()
    registry.register(Log)
    recorder = Recorder()
    host = ActorHost(
        registry, MemoryStateStore(), pool=WorkerPool(4, 64), observer=recorder, observe_every=3
    )
    await host.start()
    try:
        for i in range(9):
            assert host.tell_nowait(f"log/s{i}", i)
        assert await host.ask("log/s0", "asked") == 2  # asks are always reported
        await _idle(host)
    finally:
        await host.aclose()
    assert host.turns == 10
    assert len(recorder.turns) == 3 + 1
    assert all(t[:2] == ("log", "ok") and t[2] >= 0 for t in recorder.turns)


def test_tell_many_stops_at_a_full_run_queue_and_resumes():
    registry = AgentRegistry()
    registry.register(Log)
    host = SwarmHost(registry, MemoryStateStore(), pool=WorkerPool(1, 3))  # not started
    addresses = ["log/m0", "log/m1", "log/m0", "log/m2", "log/m3", "log/m1"]
    # m0, m1, m2 take the three places; m0's second message needs none; m3 does not fit.
    assert host.tell_many_nowait(addresses, list(range(6))) == 4
    assert host.gauges()["messages_waiting"] == 4
    assert host.pool.statistics().queued == 3
    m0 = host._activations[host._activation("log/m0").address]
    assert m0.next_message == 0 and list(m0.mailbox) == [2]
    assert host.tell_many_nowait(addresses, list(range(6)), 4) == 4  # still full
    host.pool._queue.clear()  # as if the workers took them (they stay scheduled)
    assert host.tell_many_nowait(addresses, list(range(6)), 4) == 6
    m1 = host._activations[host._activation("log/m1").address]
    assert m1.next_message == 1 and list(m1.mailbox) == [5]
    assert host.pool.statistics().queued == 1  # only m3 was idle


async def test_tell_many_delivers_in_order_and_runs_every_turn(swarm_host):
    host = swarm_host
    addresses = [f"log/b{i % 3}" for i in range(5)]
    assert host.tell_many_nowait(addresses, list(range(5))) == 5
    await _idle(host)
    states = [host._activations[host._activation(f"log/b{i}").address].state for i in range(3)]
    assert states == [{"seen": [0, 3]}, {"seen": [1, 4]}, {"seen": [2]}]
    with pytest.raises(NotFound):
        host.tell_many_nowait(["log/b0", "ghost/x", "log/b1"], [5, 6, 7])
    await _idle(host)
    assert host._activations[host._activation("log/b0").address].state == {"seen": [0, 3, 5]}
