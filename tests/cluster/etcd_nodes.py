"""Nodes of an etcd cluster in the test's process: open_node with etcd settings, a peer
listener on a free loopback port, a shared SQLite file (or memory) for state."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

from agentd import Agent
from agentd.agents import AgentRegistry
from agentd.agents.address import Address
from agentd.cluster.ownership import UNOWNED, plan_owners
from agentd.node import Node, NodeOptions, open_node
from agentd.settings import Settings

PARTITIONS = 64
OPTIONS = NodeOptions(generation=False, tools=False)


class Counter(Agent):
    """Counts its turns in its state; answers the count."""

    name = "counter"

    async def handle(self, ctx, message):
        ctx.state["n"] = ctx.state.get("n", 0) + 1
        if message:
            await asyncio.sleep(float(message))
        return ctx.state["n"]


def registry() -> AgentRegistry:
    types = AgentRegistry()
    types.register(Counter)
    return types


def node_settings(tmp_path, etcd_url: str, node: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "plugins": tmp_path / "plugins",
        "tools_cache_dir": tmp_path / "tools",
        "state_store": "sqlite",
        "state_path": tmp_path / "state.db",
        "etcd": etcd_url,
        "cluster": "test",
        "node_id": node,
        "advertise": "127.0.0.1:0",
        "partitions": PARTITIONS,
        "lease_ttl_s": 2.0,
        "status_interval_s": 0.2,
    }
    return Settings(**{**values, **overrides})


@contextlib.asynccontextmanager
async def etcd_node(
    tmp_path, etcd_url: str, node: str, options: NodeOptions = OPTIONS, **overrides: Any
) -> AsyncIterator[Node]:
    settings = node_settings(tmp_path, etcd_url, node, **overrides)
    async with open_node(settings, registry=registry(), options=options) as opened:
        yield opened


def membership(node: Node) -> Any:
    assert node.cluster is not None
    return node.cluster.membership


async def converged(nodes: Sequence[Node], timeout: float = 20.0) -> list[str]:
    """Wait until every node sees the same owners, every partition owned as planned for
    the nodes' ids; those owners."""
    ids = [membership(n).node_id for n in nodes]
    want = plan_owners(PARTITIONS, ids)
    async with asyncio.timeout(timeout):
        while True:
            views = [list(membership(n).owners) for n in nodes]
            forwarders = [n.cluster.forwarder.placement for n in nodes]
            serving = not any(membership(n).gate.fenced for n in nodes)
            if (
                serving
                and all(v == want for v in views)
                and all(p is not None and list(p.owners) == want for p in forwarders)
            ):
                return want
            await asyncio.sleep(0.05)


def addresses(count: int, agent_type: str = "counter") -> list[Address]:
    return [Address(agent_type, f"a{i}") for i in range(count)]


def unowned(owners: Sequence[str]) -> int:
    return sum(1 for o in owners if o == UNOWNED)
