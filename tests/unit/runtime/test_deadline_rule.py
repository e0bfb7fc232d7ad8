"""The actor host applies the node's deadline rule to every turn: asks and streams without
a timeout get the default, no caller gets more than the maximum, a told turn (nobody waits
for it) is stopped once it has run for the default, and ``tell`` waits for room in a full
run queue no longer than its deadline."""

from __future__ import annotations

import asyncio
import time
from typing import ClassVar

import pytest

from agentd import Agent, Message
from agentd.agents import AgentRegistry
from agentd.deadlines import DeadlinePolicy
from agentd.errors import DeadlineExceeded
from agentd.runtime import ActorHost, MemoryStateStore, Runtime, WorkerPool

DEFAULT_S = 0.3
SLACK_S = 1.0  # timers fire late on a loaded test machine


class Sleeper(Agent):
    """Sleeps for the seconds in the message (told or asked), counting what it finishes;
    "peek" answers the count in its state."""

    name = "sleeper"
    finished: ClassVar[list[str]] = []

    async def handle(self, ctx, message):
        text = message.text if isinstance(message, Message) else str(message)
        if text == "peek":
            return str(ctx.state.get("turns", 0))
        ctx.state["turns"] = ctx.state.get("turns", 0) + 1
        await asyncio.sleep(float(text))
        Sleeper.finished.append(ctx.address.id)
        return f"{ctx.time_left() is not None}"


class OwnTimeout(Agent):
    """Raises a TimeoutError of its own, well before any deadline."""

    name = "own-timeout"

    async def handle(self, ctx, message):
        async with asyncio.timeout(0.01):
            await asyncio.sleep(1)


class Stubborn(Agent):
    """Catches the first cancellation of its turn and finishes anyway."""

    name = "stubborn"
    caught: ClassVar[int] = 0

    async def handle(self, ctx, message):
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            Stubborn.caught += 1
        return "finished"


class Observer:
    def __init__(self) -> None:
        self.turns: list[tuple[str, str]] = []

    def turn_finished(self, agent_type: str, outcome: str, seconds: float) -> None:
        self.turns.append((agent_type, outcome))


_open: list[Runtime] = []


@pytest.fixture(autouse=True)
async def _runtimes():
    Sleeper.finished = []
    yield
    while _open:
        await _open.pop().aclose()


async def _runtime(
    policy: DeadlinePolicy, *, workers: int = 4, max_queued: int = 16, observe_every: int = 1
) -> tuple[Runtime, Observer]:
    registry = AgentRegistry()
    registry.register(Sleeper)
    registry.register(OwnTimeout)
    registry.register(Stubborn)
    observer = Observer()
    host = ActorHost(
        registry,
        MemoryStateStore(),
        pool=WorkerPool(workers, max_queued),
        observer=observer,
        observe_every=observe_every,
        deadlines=policy,
    )
    runtime = Runtime(host, close_timeout_s=0.1)
    await runtime.start()
    _open.append(runtime)
    return runtime, observer


async def _until(condition, limit: float = 10.0) -> None:
    end = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < end, "timed out waiting"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("observe_every", [1, 1000])  # counted also when timing is sampled
async def test_a_told_turn_past_the_default_deadline_is_stopped_and_counted(observe_every):
    runtime, observer = await _runtime(DeadlinePolicy(DEFAULT_S), observe_every=observe_every)
    host = runtime.host
    started = time.monotonic()
    await host.tell("sleeper/t", Message(text="30"))
    await _until(lambda: ("sleeper", "deadline") in observer.turns)
    assert time.monotonic() - started < DEFAULT_S + SLACK_S
    assert Sleeper.finished == []
    # The worker goes on, and the stopped turn's state change was rolled back.
    _, reply = await runtime.invoke("sleeper/t", Message(text="peek"), timeout=5)
    assert reply.text == "0"
    # A told turn within the deadline finishes, and sees its deadline.
    await host.tell("sleeper/u", Message(text="0"))
    await _until(lambda: Sleeper.finished == ["u"])
    assert observer.turns.count(("sleeper", "deadline")) == 1


async def test_without_a_default_a_told_turn_is_not_bounded():
    runtime, observer = await _runtime(DeadlinePolicy())
    await runtime.host.tell("sleeper/t", Message(text=str(DEFAULT_S + 0.2)))
    await _until(lambda: Sleeper.finished == ["t"])
    assert ("sleeper", "deadline") not in observer.turns


async def test_an_agent_s_own_timeout_error_is_an_error_not_the_deadline():
    runtime, observer = await _runtime(DeadlinePolicy(DEFAULT_S))
    await runtime.host.tell("own-timeout/x", Message())
    await _until(lambda: observer.turns)
    assert observer.turns == [("own-timeout", "error")]


async def test_asks_and_streams_without_a_timeout_get_the_default():
    runtime, _ = await _runtime(DeadlinePolicy(DEFAULT_S))
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await runtime.invoke("sleeper/a", Message(text="30"))
    assert time.monotonic() - started < DEFAULT_S + SLACK_S
    with pytest.raises(DeadlineExceeded):
        async for _ in runtime.stream("sleeper/s", Message(text="30")):
            pass
    _, reply = await runtime.invoke("sleeper/b", Message(text="0"))
    assert reply.text == "True"  # the turn saw its deadline


async def test_no_caller_gets_more_than_the_maximum():
    runtime, _ = await _runtime(DeadlinePolicy(0.1, max_s=DEFAULT_S))
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await runtime.invoke("sleeper/a", Message(text="30"), timeout=3600)
    assert time.monotonic() - started < DEFAULT_S + SLACK_S
    with pytest.raises(DeadlineExceeded, match="passed before the call"):
        await runtime.invoke("sleeper/a", Message(text="0"), timeout=0)


async def test_tell_into_a_full_run_queue_waits_no_longer_than_its_deadline():
    # One worker busy, a queue of one taken: a third agent's message has nowhere to go.
    runtime, _ = await _runtime(DeadlinePolicy(10.0), workers=1, max_queued=1)
    host = runtime.host
    busy = asyncio.ensure_future(runtime.invoke("sleeper/a", Message(text="2"), timeout=5))
    await _until(lambda: host.pool.statistics().busy == 1)
    assert host.tell_nowait("sleeper/b", Message(text="0"))
    assert not host.tell_nowait("sleeper/c", Message(text="0"))
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="no room"):
        await host.tell("sleeper/c", Message(text="0"), timeout=0.2)
    assert time.monotonic() - started < 0.2 + SLACK_S
    # Without a timeout of its own it gets the default, and gets in once there is room.
    await host.tell("sleeper/c", Message(text="0"))
    await busy
    await _until(lambda: sorted(Sleeper.finished) == ["a", "b", "c"])


async def test_an_agent_that_swallows_the_stop_leaves_no_cancellation_on_its_worker():
    Stubborn.caught = 0
    runtime, observer = await _runtime(DeadlinePolicy(DEFAULT_S), workers=1)
    await runtime.host.tell("stubborn/s", Message())
    await _until(lambda: Stubborn.caught == 1)
    # The one worker goes on to later turns: asks, a told turn, and one stopped again.
    _, reply = await runtime.invoke("sleeper/a", Message(text="0.05"), timeout=5)
    assert reply.text == "True"
    await runtime.host.tell("stubborn/s", Message())
    await _until(lambda: Stubborn.caught == 2)
    _, reply = await runtime.invoke("sleeper/a", Message(text="peek"), timeout=5)
    assert reply.text == "1"
    assert ("stubborn", "deadline") not in observer.turns  # it finished, as it chose


async def test_closing_the_runtime_stops_a_told_turn_past_its_deadline_too():
    runtime, _ = await _runtime(DeadlinePolicy(DEFAULT_S), workers=1)
    await runtime.host.tell("sleeper/t", Message(text="30"))
    await _until(lambda: runtime.host.pool.statistics().busy == 1)
    started = time.monotonic()
    await runtime.aclose()
    _open.remove(runtime)
    assert time.monotonic() - started < 5
