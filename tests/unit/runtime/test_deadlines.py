"""A call's deadline reaches it where it waits: in the run queue, in its agent's mailbox,
behind its agent's state load. The caller hears DEADLINE_EXCEEDED at its deadline (not
when a worker frees up) and the expired turn never starts; the dead call stops holding a
place in the bounded queue or mailbox."""

from __future__ import annotations

import asyncio
import time
from typing import ClassVar

import pytest

from agentd import Agent, Message
from agentd.agents import AgentRegistry
from agentd.errors import DeadlineExceeded, ResourceExhausted
from agentd.runtime import ActorHost, MemoryStateStore, Runtime, WorkerPool

# Under a loaded test machine a timer fires late by tens of milliseconds; a call that waits
# for a worker instead waits for a whole busy turn (BUSY_S).
BUSY_S = 2.0
DEADLINE_S = 0.2
SLACK_S = 0.6


class Sleeper(Agent):
    """Records each turn it starts (and signals it), then sleeps for the seconds in the
    message."""

    name = "sleeper"
    started: ClassVar[list[str]] = []
    turn_started: ClassVar[asyncio.Event]

    @staticmethod
    def _start(ctx) -> None:
        Sleeper.started.append(ctx.address.id)
        Sleeper.turn_started.set()

    async def handle(self, ctx, message):
        self._start(ctx)
        await asyncio.sleep(float(message.text or "0"))
        return "done"

    async def stream(self, ctx, message):
        self._start(ctx)
        await asyncio.sleep(float(message.text or "0"))
        yield "done"


class SlowLoadStore(MemoryStateStore):
    """A store that holds rows (so every new activation loads) and reads slowly."""

    def __init__(self, load_s: float) -> None:
        super().__init__()
        self.snapshots["sleeper/other"] = b'{"n": 1}'
        self.load_s = load_s

    async def load(self, address: str) -> bytes | None:
        await asyncio.sleep(self.load_s)
        return await super().load(address)


@pytest.fixture(autouse=True)
async def _runtimes():
    Sleeper.started = []
    Sleeper.turn_started = asyncio.Event()
    yield
    while _open:
        await _open.pop().aclose()


_open: list[Runtime] = []


async def _runtime(workers: int, *, max_queued: int = 16, **kwargs) -> Runtime:
    registry = AgentRegistry()
    registry.register(Sleeper)
    store = kwargs.pop("store", None) or MemoryStateStore()
    host = ActorHost(registry, store, pool=WorkerPool(workers, max_queued), **kwargs)
    runtime = Runtime(host, close_timeout_s=0.1)
    await runtime.start()
    _open.append(runtime)
    return runtime


async def _expect_deadline(call) -> float:
    """Await ``call``; it must raise DeadlineExceeded. Returns the seconds it took."""
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await call
    return time.monotonic() - started


async def _busy(runtime: Runtime, *ids: str) -> list[asyncio.Future]:
    calls = [
        asyncio.ensure_future(runtime.invoke(f"sleeper/{i}", Message(text=str(BUSY_S))))
        for i in ids
    ]
    while len(Sleeper.started) < len(ids):  # every one of them holds a worker now
        await Sleeper.turn_started.wait()
        Sleeper.turn_started.clear()
    return calls


async def test_a_call_waiting_in_the_run_queue_fails_at_its_deadline_and_never_runs():
    runtime = await _runtime(2)
    busy = await _busy(runtime, "a", "b")
    waited = await _expect_deadline(
        runtime.invoke("sleeper/c", Message(text="0"), timeout=DEADLINE_S)
    )
    assert waited < DEADLINE_S + SLACK_S, waited
    await asyncio.gather(*busy)
    await asyncio.sleep(0.05)  # a worker is free: the expired call would run now
    assert Sleeper.started == ["a", "b"]
    assert runtime.host.turns == 2


async def test_a_stream_waiting_in_the_run_queue_fails_at_its_deadline_and_never_runs():
    runtime = await _runtime(1)
    busy = await _busy(runtime, "a")

    async def consume() -> list:
        return [e async for e in runtime.stream("sleeper/s", Message(text="0"), timeout=0.2)]

    waited = await _expect_deadline(consume())
    assert waited < DEADLINE_S + SLACK_S, waited
    await asyncio.gather(*busy)
    await asyncio.sleep(0.05)
    assert Sleeper.started == ["a"]


async def test_expired_calls_give_back_their_places_on_the_run_queue():
    runtime = await _runtime(1, max_queued=2)
    busy = await _busy(runtime, "a")
    expired = [
        asyncio.ensure_future(runtime.invoke(f"sleeper/q{i}", Message(text="0"), timeout=0.1))
        for i in range(2)
    ]
    await asyncio.sleep(0)
    with pytest.raises(ResourceExhausted):  # the queue is full while they wait...
        await runtime.invoke("sleeper/full", Message(text="0"))
    for call in expired:
        await _expect_deadline(call)
    # ...and has room again once they expire, while the worker is still busy.
    late = asyncio.ensure_future(runtime.invoke("sleeper/late", Message(text="0")))
    await asyncio.sleep(0)
    assert runtime.host.pool.statistics().queued == 1
    assert runtime.host.pool.statistics().dropped == 2
    await asyncio.gather(*busy)
    assert (await late)[1].text == "done"
    assert Sleeper.started == ["a", "late"]


async def test_a_call_waiting_in_a_busy_agents_mailbox_fails_at_its_deadline_and_never_runs():
    runtime = await _runtime(4)
    busy = await _busy(runtime, "a")
    waited = await _expect_deadline(
        runtime.invoke("sleeper/a", Message(text="0"), timeout=DEADLINE_S)
    )
    assert waited < DEADLINE_S + SLACK_S, waited
    await asyncio.gather(*busy)
    await asyncio.sleep(0.05)
    assert Sleeper.started == ["a"]
    assert runtime.host.turns == 1
    assert runtime.host.gauges()["messages_waiting"] == 0


async def test_expired_calls_give_back_their_places_in_the_mailbox():
    runtime = await _runtime(4, max_mailbox=2)
    busy = await _busy(runtime, "a")
    expired = [
        asyncio.ensure_future(runtime.invoke("sleeper/a", Message(text="0"), timeout=0.1))
        for _ in range(2)
    ]
    await asyncio.sleep(0)
    with pytest.raises(ResourceExhausted):  # the mailbox is full while they wait...
        await runtime.invoke("sleeper/a", Message(text="0"))
    for call in expired:
        await _expect_deadline(call)
    # ...and has room again once they expired, while the agent's turn still runs.
    late = asyncio.ensure_future(runtime.invoke("sleeper/a", Message(text="0")))
    await asyncio.sleep(0)
    assert runtime.host.gauges()["messages_waiting"] == 1
    await asyncio.gather(*busy)
    assert (await late)[1].text == "done"
    assert Sleeper.started == ["a", "a"]


async def test_a_deadline_that_passes_while_the_state_loads_fails_the_call_then():
    runtime = await _runtime(4, store=SlowLoadStore(load_s=1.0))
    waited = await _expect_deadline(
        runtime.invoke("sleeper/x", Message(text="0"), timeout=DEADLINE_S)
    )
    assert waited < DEADLINE_S + SLACK_S, waited
    await asyncio.sleep(1.0)  # the load is over: the turn would start now
    assert Sleeper.started == []
    assert runtime.host.turns == 0


async def test_a_call_whose_turn_started_in_time_keeps_the_turn_deadline():
    # The deadline of a running turn still cancels that turn (outcome "deadline").
    turns: list[tuple[str, str]] = []

    class Recorder:
        def turn_finished(self, agent_type, outcome, seconds):
            turns.append((agent_type, outcome))

    runtime = await _runtime(2, observer=Recorder())
    waited = await _expect_deadline(
        runtime.invoke("sleeper/r", Message(text=str(BUSY_S)), timeout=DEADLINE_S)
    )
    assert waited < DEADLINE_S + SLACK_S, waited
    assert Sleeper.started == ["r"]
    assert turns == [("sleeper", "deadline")]


async def test_an_agent_asking_another_passes_its_deadline_to_the_queued_call():
    class Asker(Agent):
        name = "asker"

        async def handle(self, ctx, message):
            return await ctx.ask("sleeper/inner", Message(text="0"))

    runtime = await _runtime(2)
    runtime.host.registry.register(Asker)
    busy = await _busy(runtime, "a")  # one worker left: the asker takes it
    waited = await _expect_deadline(runtime.invoke("asker/1", Message(text=""), timeout=DEADLINE_S))
    assert waited < DEADLINE_S + SLACK_S, waited
    await asyncio.gather(*busy)
    await asyncio.sleep(0.05)
    assert Sleeper.started == ["a"]
