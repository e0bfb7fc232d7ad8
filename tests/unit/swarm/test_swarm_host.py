"""SwarmHost with a static placement (``agentd swarm --processes N``): new activations
skip the state load when the store was empty at open, as with one process; a host with a
forwarder and no such promise loads every new activation."""

from __future__ import annotations

import asyncio

import pytest

from agentd import Agent
from agentd.agents import AgentRegistry
from agentd.agents.address import parse_address
from agentd.cluster.forwarder import ClusterForwarder
from agentd.cluster.placement import Placement
from agentd.runtime import WorkerPool
from agentd.runtime.state.sqlite import SQLiteStateStore
from agentd.swarm.host import SwarmHost


class Counter(Agent):
    name = "counter"

    async def handle(self, ctx, message):
        ctx.state["n"] = ctx.state.get("n", 0) + 1
        return ctx.state["n"]


@pytest.mark.parametrize("static", [True, False])
async def test_a_static_swarm_host_keeps_the_stores_emptiness(tmp_path, static):
    registry = AgentRegistry()
    registry.register(Counter)
    forwarder = ClusterForwarder("p0", Placement.spread(["p0", "p1"]), {})
    store = SQLiteStateStore(tmp_path / "state.db")
    host = SwarmHost(
        registry, store, pool=WorkerPool(4, 8), forwarder=forwarder, static_placement=static
    )
    await host.start()
    try:
        assert store.empty_at_open is static
        # An agent this node owns: its first turn starts from an empty state either way.
        address = next(
            f"counter/{i}" for i in range(100) if forwarder.owns(parse_address(f"counter/{i}"))
        )
        assert await asyncio.wait_for(host.ask(address, None), 5) == 1
    finally:
        await host.aclose()
        await forwarder.aclose()
