"""Handing agents away (``ActorHost.release``): what a partition's old owner does before
the new owner may activate them.

Released agents finish their queued turns, are passivated and their last states are
committed; a second store object on the same file (the new owner) reads them. Agents still
busy past the timeout are dropped and every caller waiting in their mailboxes hears
UNAVAILABLE, none is left hanging.
"""

from __future__ import annotations

import asyncio

import pytest

from agentd import Agent
from agentd.agents import AgentRegistry
from agentd.errors import Unavailable
from agentd.runtime import ActorHost, SQLiteStateStore, WorkerPool


class Counter(Agent):
    name = "counter"
    gate: asyncio.Event | None = None

    async def handle(self, ctx, message):
        if message == "wait" and self.gate is not None:
            await self.gate.wait()
        ctx.state["n"] = ctx.state.get("n", 0) + 1
        return str(ctx.state["n"])


def _host(path) -> ActorHost:
    registry = AgentRegistry()
    registry.register(Counter)
    return ActorHost(registry, SQLiteStateStore(path), pool=WorkerPool(8, 64))


async def test_released_agents_finish_their_turns_and_are_read_by_the_next_owner(
    tmp_path,
) -> None:
    host = _host(tmp_path / "state.db")
    await host.start()
    try:
        for i in range(10):
            for _ in range(3):
                host.tell_nowait(f"counter/{i}", "tick")  # queued, nobody waits
        released = await host.release(lambda a: int(a.id) % 2 == 0, timeout=5)
        assert released == 5
        assert sorted(host.active_counts().items()) == [("counter", 5)]
        # The new owner: another store object on the same file, as another process has.
        other = _host(tmp_path / "state.db")
        await other.start()
        try:
            for i in (1, 3, 5, 7, 9):
                assert await other.ask(f"counter/{i}", "tick") == "4"
        finally:
            await other.aclose()
        # Kept agents stay active with their states.
        assert await host.ask("counter/0", "tick") == "4"
    finally:
        await host.aclose()


async def test_agents_busy_past_the_timeout_are_dropped_and_their_callers_answered(
    tmp_path,
) -> None:
    host = _host(tmp_path / "state.db")
    await host.start()
    gate = Counter.gate = asyncio.Event()
    try:
        running = asyncio.ensure_future(host.ask("counter/x", "wait"))
        await asyncio.sleep(0.05)
        queued = [asyncio.ensure_future(host.ask("counter/x", "tick")) for _ in range(3)]
        await asyncio.sleep(0.01)
        released = await host.release(lambda a: False, timeout=0.2)
        assert released == 1
        assert host.active_counts() == {"counter": 0}
        for waiter in queued:  # every caller waiting in the mailbox hears, none hangs
            with pytest.raises(Unavailable, match="moved to another node"):
                await asyncio.wait_for(waiter, 2)
        gate.set()  # the running turn ends on its own
        assert await asyncio.wait_for(running, 2) == "1"
    finally:
        Counter.gate = None
        gate.set()
        await host.aclose()


def test_agent_types_keep_state_unless_they_say_otherwise() -> None:
    # The cluster forwards calls to the owner of an address unless its type is stateless.
    from agentd.agents.builtin.echo import Echo

    assert Counter.stateless is False
    assert Echo.stateless is True
