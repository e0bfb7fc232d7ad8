"""A caller abandoning its turn cancels that turn, never the worker: and a real
cancellation of the worker (the pool shutting down) that lands in the same loop iteration
as the abandonment is not eaten by it. Deterministic: both cancellations are requested
from one synchronous block, before the worker runs again."""

from __future__ import annotations

import asyncio

import pytest

from agentd import Agent
from agentd.agents import AgentRegistry
from agentd.errors import Unavailable
from agentd.runtime import ActorHost, MemoryStateStore, WorkerPool


class Holder(Agent):
    """Records the worker task running its turn, then waits until cancelled."""

    name = "holder"
    workers: asyncio.Queue[asyncio.Task] | None = None

    async def handle(self, ctx, message):
        if message == "quick":
            return "quick"
        assert Holder.workers is not None
        Holder.workers.put_nowait(asyncio.current_task())  # type: ignore[arg-type]
        await asyncio.sleep(60)
        return "woke"


class Recorder:
    def __init__(self) -> None:
        self.outcomes: list[str] = []

    def turn_finished(self, agent_type: str, outcome: str, seconds: float) -> None:
        self.outcomes.append(outcome)


@pytest.fixture
async def host():
    Holder.workers = asyncio.Queue()
    registry = AgentRegistry()
    registry.register(Holder)
    recorder = Recorder()
    host = ActorHost(registry, MemoryStateStore(), pool=WorkerPool(1, 8), observer=recorder)
    host.recorder = recorder  # type: ignore[attr-defined]
    await host.start()
    yield host
    await host.aclose(grace=0.1)


async def _running_turn(host: ActorHost) -> tuple[asyncio.Task, asyncio.Task]:
    """An ask whose turn is running: (the caller's task, the worker's task)."""
    caller = asyncio.ensure_future(host.ask("holder/a", "hold"))
    assert Holder.workers is not None
    async with asyncio.timeout(5):
        worker = await Holder.workers.get()
    return caller, worker


async def test_abandoning_a_turn_cancels_the_turn_not_the_worker(host):
    caller, worker = await _running_turn(host)
    caller.cancel()  # the client went away
    with pytest.raises(asyncio.CancelledError):
        await caller
    async with asyncio.timeout(5):
        assert await host.ask("holder/b", "quick") == "quick"  # the worker goes on
    assert not worker.done()
    assert worker.cancelling() == 0  # nothing left over to hit the worker later
    assert host.recorder.outcomes == ["cancelled", "ok"]


@pytest.mark.parametrize("order", ["abandon-then-shutdown", "shutdown-then-abandon"])
async def test_a_shutdown_in_the_same_iteration_as_an_abandonment_stops_the_worker(host, order):
    caller, worker = await _running_turn(host)
    # One synchronous block: both cancellations reach the worker before it runs again.
    if order == "abandon-then-shutdown":
        caller.cancel()  # cancels the reply: the turn's watch will cancel the worker
        worker.cancel()  # the pool shutting down (what WorkerPool.aclose does past grace)
    else:
        worker.cancel()
        caller.cancel()
    async with asyncio.timeout(5):
        await asyncio.wait([worker, caller])
    assert worker.cancelled(), "the worker swallowed the shutdown and went on"
    assert caller.cancelled()
    assert host.recorder.outcomes == ["cancelled"]
    # The worker is gone: a new call is not run (the pool is down to zero workers).
    late = asyncio.ensure_future(host.ask("holder/c", "quick"))
    await asyncio.sleep(0.1)
    assert not late.done()
    late.cancel()


async def test_the_shutdown_answers_the_caller_of_the_turn_it_cancels(host):
    caller, worker = await _running_turn(host)
    worker.cancel()
    with pytest.raises(Unavailable, match="shutting down"):
        async with asyncio.timeout(5):
            await caller


class Stubborn(Agent):
    """Catches the CancelledError of its abandoned turn and finishes anyway."""

    name = "stubborn"

    async def handle(self, ctx, message):
        assert Holder.workers is not None
        Holder.workers.put_nowait(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            return "ignored the cancellation"
        return "woke"


async def test_an_agent_that_swallows_its_abandonment_leaves_nothing_behind(host):
    host.registry.register(Stubborn)
    for _ in range(2):  # the second abandonment must not look like a shutdown
        caller = asyncio.ensure_future(host.ask("stubborn/s", "hold"))
        async with asyncio.timeout(5):
            worker = await Holder.workers.get()
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        async with asyncio.timeout(5):
            assert await host.ask("holder/q", "quick") == "quick"
        assert not worker.done()
        assert worker.cancelling() == 0
