"""A tell held by the ownership gate while its partition is handed over keeps its sender's
trace context: redelivered after the hold, its turn is still a child of the sender's span."""

from __future__ import annotations

import asyncio

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agentd import Agent
from agentd.agents import AgentRegistry
from agentd.agents.address import Address
from agentd.cluster.forwarder import ClusterForwarder
from agentd.cluster.ownership import OwnershipGate
from agentd.cluster.placement import Placement, partition_of
from agentd.observability.spans import Spans
from agentd.runtime import ActorHost, MemoryStateStore, WorkerPool


class Sink(Agent):
    name = "sink"
    told = asyncio.Event()

    async def handle(self, ctx, message):
        Sink.told.set()


async def test_a_held_tell_is_redelivered_in_its_senders_trace() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    registry = AgentRegistry()
    registry.register(Sink)
    # One node owning every partition; its gate holds the target's during a "hand-over".
    inner = ClusterForwarder("a", Placement.spread(["a"], 64), {})
    host = ActorHost(registry, MemoryStateStore(), pool=WorkerPool(2, 16), spans=Spans(tracer))
    gate = OwnershipGate(inner, host, node_id="a", partitions=64)
    host.forwarder = gate
    await host.start()
    Sink.told.clear()
    target = Address("sink", "s1")
    try:
        gate.hold([partition_of(target, 64)])
        with tracer.start_as_current_span("sender") as sender:
            assert host.tell_nowait(target, "hello")  # held, not run
        await asyncio.sleep(0.05)
        assert not Sink.told.is_set()
        gate.unhold([partition_of(target, 64)])  # redelivered, here
        await asyncio.wait_for(Sink.told.wait(), 5)
        await asyncio.sleep(0.02)  # the told turn's span ends after its handler
    finally:
        await gate.aclose()
        await host.aclose()
        provider.shutdown()
    (turn,) = [s for s in exporter.get_finished_spans() if s.name == "agent.turn"]
    assert turn.attributes["agentd.agent.address"] == "sink/s1"
    assert turn.context.trace_id == sender.get_span_context().trace_id
    assert turn.parent.span_id == sender.get_span_context().span_id
