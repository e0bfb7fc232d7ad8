"""The swarm's two agent types, bound to one run by :class:`SwarmRun`.

Decider ``i`` reports to collector shard ``i % K``. Each shard counts the reports of its
share of the agents; a run is done when every shard has heard from all of its agents.
With ``--processes N`` the shards are spread evenly over the processes, so no process
runs every collector turn (and most reports still cross processes: a decider's shard is
on another process with odds (N-1)/N).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from agentd.agents import Agent, Context
from agentd.agents.address import Address
from agentd.runtime import ActorHost

__all__ = ["Collector", "Decider", "SwarmRun", "Tally", "shard_address"]


def shard_address(name: str) -> Address:
    """The address of the collector shard named ``name``."""
    return Address("collector", name)


class Decider(Agent):
    """Gets its features, asks the ``decision`` model, remembers and reports the action."""

    __slots__ = ()
    name = "decider"
    description = "Swarm agent: picks an action with the decision model, reports it."
    collectors: ClassVar[tuple[Address, ...]] = (shard_address("c0"),)

    async def handle(self, ctx: Context, message: tuple[int, np.ndarray]) -> None:
        index, features = message
        result = await ctx.infer("decision", {"features": features}, outputs=("action",))
        action = int(result["action"][0])
        ctx.state["action"] = action
        collectors = self.collectors
        await ctx.send(collectors[index % len(collectors)], (index, action))


class Collector(Agent):
    """One collector shard: counts the distinct reports of the deciders ``i`` with
    ``i % K == j`` (``j``: this shard's place among the run's K shards) and tells its run
    when it has heard from all of them.

    Its tallies live on the instance, not in ``ctx.state``: a state holding a million
    results would be rewritten on every turn.
    """

    name = "collector"
    description = "Swarm collector shard: checks that its agents reported exactly once."
    run: ClassVar[SwarmRun]

    def __init__(self) -> None:
        self.shard = -1  # j, known at the first report (from this agent's address)
        self.count = 1  # K
        self.expected = 0
        # A byte per agent of this shard and plain ints: numpy scalar indexing per
        # message cost more.
        self.seen = bytearray()
        self.distinct = 0
        self.duplicates = 0
        self.actions = [0, 0, 0, 0]

    async def handle(self, ctx: Context, message: tuple[int, int]) -> None:
        index, action = message
        if self.shard < 0:
            self._bind(ctx.address)
        position, shard = divmod(index, self.count)
        # A report meant for another shard is an error of the run: counted as a duplicate.
        if shard != self.shard or self.seen[position]:
            self.duplicates += 1
        else:
            self.seen[position] = 1
            self.distinct += 1
            self.actions[action] += 1
            if self.distinct == self.expected:
                self.run.shard_done()

    def _bind(self, address: Address) -> None:
        run = self.run
        self.shard = run.shards.index(address)
        self.count = len(run.shards)
        self.expected = run.expected(self.shard)
        self.seen = bytearray(self.expected)


@dataclass(frozen=True)
class Tally:
    """What collector shards heard: distinct reports, duplicates, reports per action."""

    distinct: int
    duplicates: int
    actions: tuple[int, int, int, int]

    def __add__(self, other: Tally) -> Tally:
        return Tally(
            self.distinct + other.distinct,
            self.duplicates + other.duplicates,
            tuple(a + b for a, b in zip(self.actions, other.actions, strict=True)),  # type: ignore[arg-type]
        )


NO_REPORTS = Tally(0, 0, (0, 0, 0, 0))


class SwarmRun:
    """One run of ``agents`` deciders and the collector ``shards`` they report to;
    ``local``: the shards this process runs (default: all). ``done`` is set, and
    ``finished_at`` (wall clock) recorded, when every local shard has heard from all of
    its agents (at once when none has any)."""

    def __init__(
        self, agents: int, shards: Sequence[Address], local: Sequence[Address] | None = None
    ) -> None:
        if not shards:
            raise ValueError("a swarm needs at least one collector shard")
        self.agents = agents
        self.shards = tuple(shards)
        self.local = self.shards if local is None else tuple(local)
        # Shards that expect no report (fewer agents than shards) are done from the start.
        self._left = sum(1 for a in self.local if self.expected(self.shards.index(a)))
        self.done = asyncio.Event()
        self.finished_at = 0.0
        if not self._left:
            self._finish()
        self.decider_type: type[Decider] = type(
            "RunDecider", (Decider,), {"__slots__": (), "collectors": self.shards}
        )
        self.collector_type: type[Collector] = type("RunCollector", (Collector,), {"run": self})

    def expected(self, shard: int) -> int:
        """How many deciders report to shard number ``shard``: those ``i`` with
        ``i % K == shard``."""
        return len(range(shard, self.agents, len(self.shards)))

    def shard_done(self) -> None:
        self._left -= 1
        if not self._left:
            self._finish()

    def _finish(self) -> None:
        self.finished_at = time.time()
        self.done.set()

    def tally(self, host: ActorHost) -> Tally:
        """The local shards' counts summed (a shard not yet active has heard nothing)."""
        total = NO_REPORTS
        for address in self.local:
            shard = host.instance(address)
            if isinstance(shard, Collector):
                total += Tally(shard.distinct, shard.duplicates, tuple(shard.actions))  # type: ignore[arg-type]
        return total
