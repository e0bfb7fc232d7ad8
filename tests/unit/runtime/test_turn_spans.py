"""Turn spans in the actor host, with the OpenTelemetry SDK's in-memory exporter: each turn
a child of the span that sent its message (ask, stream, tell), its outcome and error code;
with tracing off nothing is captured and tells stay bare."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from agentd import Agent
from agentd.agents import AgentRegistry
from agentd.errors import NotFound
from agentd.observability.spans import Spans
from agentd.runtime import ActorHost, MemoryStateStore, WorkerPool
from agentd.runtime.mailbox import Envelope


class Relay(Agent):
    """Asks ``sink/a`` and tells ``sink/b``; "missing" raises NotFound, "boom" ValueError."""

    name = "relay"

    async def handle(self, ctx, message):
        if message == "missing":
            raise NotFound("no such thing")
        if message == "boom":
            raise ValueError("kaboom")
        await ctx.send("sink/b", message)
        return await ctx.ask("sink/a", message)

    async def stream(self, ctx, message):
        yield await ctx.ask("sink/a", message)


class Sink(Agent):
    name = "sink"
    told = asyncio.Event()

    async def handle(self, ctx, message):
        ctx.state["seen"] = message
        if ctx.address.id == "b":
            Sink.told.set()
        return "ok"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.clear()


def _host(spans: Spans | None) -> ActorHost:
    registry = AgentRegistry()
    registry.register(Relay)
    registry.register(Sink)
    return ActorHost(registry, MemoryStateStore(), pool=WorkerPool(2, 64), spans=spans)


def _tracer(exporter: InMemorySpanExporter):
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test")


def _turn(spans: list[ReadableSpan], address: str) -> ReadableSpan:
    (found,) = [
        s
        for s in spans
        if s.name == "agent.turn" and s.attributes["agentd.agent.address"] == address
    ]
    return found


async def test_turns_are_children_of_their_senders(exporter: InMemorySpanExporter) -> None:
    tracer = _tracer(exporter)
    host = _host(Spans(tracer))
    await host.start()
    Sink.told.clear()
    try:
        with tracer.start_as_current_span("caller") as caller:
            assert await host.ask("relay/r", "hello") == "ok"
        await asyncio.wait_for(Sink.told.wait(), 5)
        await asyncio.sleep(0.01)  # the told turn's span ends after its handler
    finally:
        await host.aclose()
    spans = exporter.get_finished_spans()
    relay = _turn(spans, "relay/r")
    asked, told = _turn(spans, "sink/a"), _turn(spans, "sink/b")
    assert relay.parent.span_id == caller.get_span_context().span_id
    assert asked.parent.span_id == relay.context.span_id
    assert told.parent.span_id == relay.context.span_id
    assert {s.context.trace_id for s in (relay, asked, told)} == {
        caller.get_span_context().trace_id
    }
    assert relay.attributes["agentd.turn.kind"] == "ask"
    assert told.attributes["agentd.turn.kind"] == "tell"
    assert relay.attributes["agentd.agent.type"] == "relay"
    assert relay.attributes["agentd.turn.outcome"] == "ok"
    # The sink's states went to the store: a commit span under the asked turn.
    commits = [s for s in spans if s.name == "state.commit"]
    assert [c.parent.span_id for c in commits] == [asked.context.span_id]


async def test_stream_turn_is_a_child_of_its_caller(exporter: InMemorySpanExporter) -> None:
    tracer = _tracer(exporter)
    host = _host(Spans(tracer))
    await host.start()
    try:
        with tracer.start_as_current_span("caller") as caller:
            events = [event async for event in host.ask_stream("relay/s", "x")]
    finally:
        await host.aclose()
    assert events == ["ok"]
    turn = _turn(exporter.get_finished_spans(), "relay/s")
    assert turn.parent.span_id == caller.get_span_context().span_id
    assert turn.attributes["agentd.turn.kind"] == "stream"


@pytest.mark.parametrize(("message", "code"), [("missing", "NOT_FOUND"), ("boom", "INTERNAL")])
async def test_a_failed_turn_has_its_error_code(
    exporter: InMemorySpanExporter, message: str, code: str
) -> None:
    host = _host(Spans(_tracer(exporter)))
    await host.start()
    try:
        with pytest.raises(Exception):  # noqa: B017 (NotFound, or Internal for the ValueError)
            await host.ask("relay/f", message)
    finally:
        await host.aclose()
    turn = _turn(exporter.get_finished_spans(), "relay/f")
    assert turn.parent is None  # no trace current at the caller: the turn begins one
    assert turn.attributes["agentd.turn.outcome"] == "error"
    assert turn.attributes["agentd.error.code"] == code
    assert turn.status.status_code is StatusCode.ERROR


async def test_tracing_off_captures_nothing() -> None:
    host = _host(None)
    await host.start()
    try:
        activation = host._activation("sink/idle")
        activation.phase = activation.phase.__class__.RUNNING  # hold the message in its mailbox
        assert host.tell_nowait("sink/idle", "bare")
        assert activation.next_message == "bare"  # no envelope for a tell
        envelope = host._post("sink/x", "asked", None, None)
        assert type(envelope) is Envelope and envelope.context is None
        assert await envelope.reply == "ok"
    finally:
        await host.aclose()
