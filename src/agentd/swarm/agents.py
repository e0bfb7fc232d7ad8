"""The swarm's two agent types."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import numpy as np

from agentd.agents import Agent, Context
from agentd.agents.address import Address

__all__ = ["Collector", "Decider", "make_collector"]

COLLECTOR = Address("collector", "main")


class Decider(Agent):
    """Gets its features, asks the ``decision`` model, remembers and reports the action."""

    __slots__ = ()
    name = "decider"
    description = "Swarm agent: picks an action with the decision model, reports it."

    async def handle(self, ctx: Context, message: tuple[int, np.ndarray]) -> None:
        index, features = message
        result = await ctx.infer("decision", {"features": features}, outputs=("action",))
        action = int(result["action"][0])
        ctx.state["action"] = action
        await ctx.send(COLLECTOR, (index, action))


class Collector(Agent):
    """Counts distinct reports; sets ``done`` after ``expected`` of them.

    Its tallies live on the instance, not in ``ctx.state``: a state holding a million
    results would be rewritten on every turn.
    """

    name = "collector"
    description = "Swarm collector: checks that every agent reported exactly once."
    expected: ClassVar[int] = 0
    done: ClassVar[asyncio.Event]

    def __init__(self) -> None:
        # A byte per agent and plain ints: numpy scalar indexing per message cost more.
        self.seen = bytearray(self.expected)
        self.distinct = 0
        self.duplicates = 0
        self.actions = [0, 0, 0, 0]

    async def handle(self, ctx: Context, message: tuple[int, int]) -> None:
        index, action = message
        if self.seen[index]:
            self.duplicates += 1
        else:
            self.seen[index] = 1
            self.distinct += 1
            self.actions[action] += 1
            if self.distinct == self.expected:
                self.done.set()


def make_collector(expected: int) -> type[Collector]:
    """A Collector type bound to one run (its target count and completion event)."""
    attrs: dict[str, Any] = {"expected": expected, "done": asyncio.Event(), "name": "collector"}
    return type("RunCollector", (Collector,), attrs)
