"""An activation's lifecycle (Phase) and its mailbox, driven directly: no sockets, no
server. IDLE -> SCHEDULED on a message, RUNNING while a worker runs it, IDLE (or
SCHEDULED again when more wait) after, PASSIVATED once dropped."""

from __future__ import annotations

import asyncio

import pytest

from agentd import Agent
from agentd.agents import Address, AgentRegistry
from agentd.errors import ResourceExhausted
from agentd.runtime import ActorHost, MemoryStateStore, WorkerPool
from agentd.runtime.activation import TURNS_PER_RUN, Phase
from agentd.runtime.mailbox import NO_MESSAGE, Envelope, Mailbox


class Gate(Agent):
    """Counts its turns; a turn on "wait" holds until the class's gate opens."""

    name = "gate"
    gate: asyncio.Event

    async def handle(self, ctx, message):
        if message == "wait":
            await Gate.gate.wait()
        ctx.state["turns"] = ctx.state.get("turns", 0) + 1
        return ctx.state["turns"]


def _host(workers: int = 1, queued: int = 8) -> ActorHost:
    registry = AgentRegistry()
    registry.register(Gate)
    return ActorHost(registry, MemoryStateStore(), pool=WorkerPool(workers, queued))


async def _until(condition, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.001)


async def test_the_phases_of_one_activation():
    Gate.gate = asyncio.Event()
    host = _host()
    activation = host._activation("gate/a")
    assert activation.phase is Phase.IDLE
    assert host.tell_nowait("gate/a", "wait")
    assert activation.phase is Phase.SCHEDULED  # on the run queue; no worker yet
    await host.start()
    try:
        await _until(lambda: activation.phase is Phase.RUNNING)
        assert host.tell_nowait("gate/a", "more")  # waits behind the running turn
        assert host.pool.statistics().queued == 0  # needs no second place on the queue
        Gate.gate.set()
        await _until(lambda: activation.phase is Phase.IDLE)
        assert activation.state == {"turns": 2} and activation.waiting() == 0
        assert host.passivate_idle(0) == 1
        assert activation.phase is Phase.PASSIVATED
        # The next message makes a new activation, which reads the state back.
        assert await host.ask("gate/a", "again") == 3
        assert host._activation("gate/a") is not activation
    finally:
        await host.aclose()


async def test_a_busy_agent_gives_up_its_worker_and_is_requeued():
    Gate.gate = asyncio.Event()
    host = _host()  # not started: the test takes the jobs off the queue as a worker would
    activation = host._activation("gate/busy")
    for _ in range(TURNS_PER_RUN + 1):
        assert host.tell_nowait("gate/busy", "go")
    queue = host.pool._queue
    assert list(queue) == [activation] and activation.phase is Phase.SCHEDULED
    await queue.popleft().run()
    # TURNS_PER_RUN turns, then the worker is given up with one message still waiting.
    assert activation.state == {"turns": TURNS_PER_RUN} and activation.waiting() == 1
    assert list(queue) == [activation] and activation.phase is Phase.SCHEDULED
    await queue.popleft().run()
    assert activation.state == {"turns": TURNS_PER_RUN + 1}
    assert not queue and activation.phase is Phase.IDLE


async def test_a_queued_agent_whose_asks_all_expired_is_dropped_and_idle():
    host = _host()  # not started: the agent stays queued
    activation = host._activation("gate/late")
    loop = asyncio.get_running_loop()
    reply = loop.create_future()
    activation.push(Envelope("x", reply, None, None), 10)
    host._waiting += 1
    host.pool.submit_nowait(activation)
    activation.phase = Phase.SCHEDULED
    reply.cancel()  # the caller gave up
    assert activation.drop_if_expired()
    assert activation.phase is Phase.IDLE
    assert activation.waiting() == 0 and host.gauges()["messages_waiting"] == 0


def test_a_mailbox_keeps_order_across_its_slot_and_its_deque():
    loop = asyncio.new_event_loop()
    try:
        box = Mailbox(Address("t", "1"))
        box.push("a", 3)
        assert box.next_message == "a" and box.mailbox is None  # the slot, no deque
        dead = Envelope("b", loop.create_future(), None, None)
        box.push(dead, 3)
        box.push("c", 3)
        assert box.waiting() == 3
        with pytest.raises(ResourceExhausted, match="t/1 has 3 messages waiting"):
            box.push("d", 3)
        dead.reply.cancel()  # type: ignore[union-attr]
        box.push("d", 3)  # a dead ask makes room
        assert [box.next_message, *box.mailbox] == ["a", "c", "d"]  # type: ignore[misc]
        box.unpush()
        assert box.waiting() == 2
        assert box.drop_dead() == 0
    finally:
        loop.close()
    empty = Mailbox(Address("t", "2"))
    assert empty.next_message is NO_MESSAGE and empty.waiting() == 0
