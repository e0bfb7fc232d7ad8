"""``state.commit`` spans carry their group's size (``agentd.state.batch_size``) from every
store: the memory store (each save commits alone) and Redis on a real redis-server (the
saves of one round trip), as SQLite's did already."""

from __future__ import annotations

import asyncio

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agentd import Agent
from agentd.agents import AgentRegistry
from agentd.observability.spans import Spans
from agentd.runtime import ActorHost, MemoryStateStore, WorkerPool
from agentd.runtime.state.redis import RedisStateStore
from tests.cluster.servers import Server


class Counter(Agent):
    name = "counter"

    async def handle(self, ctx, message):
        ctx.state["seen"] = ctx.state.get("seen", 0) + 1
        return ctx.state["seen"]


async def _commit_sizes(store) -> list[object]:
    """The batch sizes of the commit spans of 40 concurrent asks to 40 agents."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    registry = AgentRegistry()
    registry.register(Counter)
    host = ActorHost(
        registry, store, pool=WorkerPool(8, 128), spans=Spans(provider.get_tracer("test"))
    )
    await host.start()
    try:
        answers = await asyncio.gather(*(host.ask(f"counter/{i}", "go") for i in range(40)))
        assert answers == [1] * 40
        await asyncio.sleep(0.05)  # the last commit spans end in their futures' callbacks
    finally:
        await host.aclose()
        provider.shutdown()
    commits = [s for s in exporter.get_finished_spans() if s.name == "state.commit"]
    assert len(commits) == 40
    return [c.attributes.get("agentd.state.batch_size") for c in commits]


async def test_memory_store_commits_are_batches_of_one() -> None:
    assert await _commit_sizes(MemoryStateStore()) == [1] * 40


async def test_redis_store_commits_carry_the_size_of_their_round_trip(redis: Server) -> None:
    sizes = await _commit_sizes(RedisStateStore(redis.url))
    assert all(type(size) is int and 1 <= size <= 40 for size in sizes), sizes
    # Saves made while a round trip is out go together in the next one.
    assert max(sizes) > 1, sizes
