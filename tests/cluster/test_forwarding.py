"""Forwarding between nodes: two real nodes (open_node) in this process, joined by real
peer sockets (unix and TCP), static placement as ``--processes 2`` sets it up."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client.parser import text_string_to_metric_families

from agentd import Agent
from agentd.agents import AgentRegistry
from agentd.agents.address import Address
from agentd.agents.builtin.echo import Echo
from agentd.agents.message import Message
from agentd.errors import DeadlineExceeded, InvalidArgument, NotFound, Unavailable
from agentd.node import Node, NodeOptions, open_node
from agentd.observability.spans import Spans
from agentd.settings import Settings

# What the agents saw, by node (all nodes run in this process).
SEEN: dict[str, list[Any]] = {}
CANCELLED: list[str] = []


class Record(Agent):
    name = "record"

    async def handle(self, ctx, message):
        SEEN.setdefault(str(ctx.address), []).append(message)
        return message


class Sleeper(Agent):
    name = "sleeper"

    async def handle(self, ctx, message):
        try:
            await asyncio.sleep(float(message))
        except asyncio.CancelledError:
            CANCELLED.append(str(ctx.address))
            raise
        return "woke"


class Relay(Agent):
    """(target, payload): tells ``payload`` to ``target``, then asks it and answers."""

    name = "relay"

    async def handle(self, ctx, message):
        target, payload = message
        await ctx.send(target, ("told", payload))
        return await ctx.ask(target, ("asked", payload))


class Fan(Agent):
    """Tells each of the addresses in ``message`` its index (no reply awaited)."""

    name = "fan"

    async def handle(self, ctx, message):
        for index, target in enumerate(message):
            await ctx.send(target, index)
        return len(message)


class Missing(Agent):
    name = "missing"

    async def handle(self, ctx, message):
        raise NotFound(f"no such thing as {message}")


class Ticks(Agent):
    name = "ticks"

    async def handle(self, ctx, message):
        return "stream me"

    async def stream(self, ctx, message):
        for i in range(int(message)):
            await asyncio.sleep(0.01)
            yield f"tick {i}"


def registry() -> AgentRegistry:
    types = AgentRegistry()
    for agent_type in (Record, Sleeper, Relay, Fan, Missing, Ticks, Echo):
        types.register(agent_type)
    return types


def settings(tmp_path, node: str, peers: list[str], **overrides) -> Settings:
    values: dict[str, Any] = {
        "plugins": tmp_path / "plugins",
        "state_store": "memory",
        "tools_cache_dir": tmp_path / "tools",
        "node_id": node,
        "peers": peers,
        "partitions": 64,
    }
    return Settings(**{**values, **overrides})


OPTIONS = NodeOptions(generation=False, tools=False)


@contextlib.asynccontextmanager
async def cluster(tmp_path, scheme: str = "unix", **overrides) -> AsyncIterator[list[Node]]:
    """Nodes a and b, each owning half of the partitions."""
    if scheme == "unix":
        peers = [f"{n}=unix:{tmp_path}/{n}.sock" for n in "ab"]
    else:
        import socket

        ports = []
        for _ in "ab":
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                ports.append(s.getsockname()[1])
        peers = [f"{n}=tcp:127.0.0.1:{p}" for n, p in zip("ab", ports, strict=True)]
    async with contextlib.AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(
                open_node(
                    settings(tmp_path, n, peers, **overrides), registry=registry(), options=OPTIONS
                )
            )
            for n in "ab"
        ]
        yield nodes


def owned_by(node: Node, owner: str, agent_type: str, count: int = 1) -> list[Address]:
    forwarder = node.cluster.forwarder
    found = []
    for i in range(10_000):
        address = Address(agent_type, f"x{i}")
        if forwarder.owner(address) == owner:
            found.append(address)
            if len(found) == count:
                return found
    raise AssertionError("no address found")


@pytest.fixture(autouse=True)
def _clear():
    SEEN.clear()
    CANCELLED.clear()


@pytest.mark.parametrize("scheme", ["unix", "tcp"])
async def test_an_ask_to_an_agent_owned_by_the_other_node_runs_there(tmp_path, scheme):
    async with cluster(tmp_path, scheme) as (a, b):
        address = owned_by(a, "b", "record")[0]
        payload = {"k": [1, 2.5, "x", b"y", None, True], "t": (1, 2), "m": Message("hi")}
        _, reply = await a.runtime.invoke(address, Message(text="hello"))
        assert reply.text == "hello"
        assert await a.runtime.host.ask(address, payload) == payload
        # It ran on b: active there, not on a.
        assert b.runtime.host.active_counts().get("record") == 1
        assert a.runtime.host.active_counts().get("record", 0) == 0
        assert b.cluster.server.frames_received >= 2
        # And b's own calls to it stay local.
        assert await b.runtime.host.ask(address, 7) == 7
        array = np.arange(16, dtype=np.float32).reshape(1, 16)
        echoed = await a.runtime.host.ask(address, (3, array))
        assert echoed[0] == 3
        np.testing.assert_array_equal(echoed[1], array)


async def test_tells_are_batched_into_few_frames(tmp_path):
    async with cluster(tmp_path) as (a, b):
        targets = owned_by(a, "b", "record", 200)
        host = a.runtime.host
        for round_ in range(10):
            for address in targets:
                assert host.tell_nowait(address, (round_, 1))
        client = a.cluster.forwarder.client("b")
        async with asyncio.timeout(10):
            while sum(len(v) for v in SEEN.values()) < 2000:
                await asyncio.sleep(0.01)
        assert client.tells_sent == 2000
        assert client.frames_sent <= 3, client.frames_sent  # one per loop iteration
        assert b.cluster.server.tells_received == 2000
        # Order per agent is kept.
        for address in targets:
            assert SEEN[str(address)] == [(r, 1) for r in range(10)]


async def test_agents_send_and_ask_across_nodes(tmp_path):
    async with cluster(tmp_path) as (a, _):
        relay = owned_by(a, "a", "relay")[0]
        target = owned_by(a, "b", "record")[0]
        reply = await a.runtime.host.ask(relay, (str(target), "p"))
        assert reply == ("asked", "p")
        # The tell came first and arrived first.
        assert SEEN[str(target)] == [("told", "p"), ("asked", "p")]
        # And the other way round: a relay on b, a target on a.
        relay_b = owned_by(a, "b", "relay")[0]
        target_a = owned_by(a, "a", "record")[0]
        assert await a.runtime.host.ask(relay_b, (str(target_a), 5)) == ("asked", 5)


async def test_a_forwarded_ask_keeps_its_deadline_and_the_remote_turn_is_cancelled(tmp_path):
    async with cluster(tmp_path) as (a, _):
        address = owned_by(a, "b", "sleeper")[0]
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await a.runtime.host.ask(address, 5.0, timeout=0.3)
        waited = time.monotonic() - started
        assert 0.25 <= waited < 2.0
        async with asyncio.timeout(5):
            while str(address) not in CANCELLED:
                await asyncio.sleep(0.01)
        assert await a.runtime.host.ask(address, 0.0, timeout=5) == "woke"


async def test_cancelling_the_caller_cancels_the_remote_turn(tmp_path):
    async with cluster(tmp_path) as (a, b):
        address = owned_by(a, "b", "sleeper")[0]
        call = asyncio.ensure_future(a.runtime.host.ask(address, 30.0))
        async with asyncio.timeout(5):
            while b.runtime.host.active_counts().get("sleeper", 0) == 0:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        async with asyncio.timeout(5):
            while str(address) not in CANCELLED:
                await asyncio.sleep(0.01)


async def test_errors_keep_their_class_and_message(tmp_path):
    async with cluster(tmp_path) as (a, b):
        missing = owned_by(a, "b", "missing")[0]
        with pytest.raises(NotFound, match="no such thing as 42"):
            await a.runtime.host.ask(missing, 42)
        unknown = owned_by(a, "b", "nosuchtype")[0]
        with pytest.raises(NotFound) as local:
            await b.runtime.host.ask(unknown, 1)
        with pytest.raises(NotFound) as forwarded:
            await a.runtime.host.ask(unknown, 1)
        assert str(forwarded.value) == str(local.value)
        # What cannot cross nodes is refused at send time, clearly.
        record = owned_by(a, "b", "record")[0]
        with pytest.raises(InvalidArgument, match=r"cannot send .*object.* on another node"):
            await a.runtime.host.ask(record, object())
        with pytest.raises(InvalidArgument, match="on another node"):
            a.runtime.host.tell_nowait(record, {1, 2})


async def test_a_stream_across_nodes(tmp_path):
    async with cluster(tmp_path) as (a, b):
        address = owned_by(a, "b", "ticks")[0]
        events = [event async for event in a.runtime.host.ask_stream(address, 3)]
        assert events == ["tick 0", "tick 1", "tick 2"]
        assert b.runtime.host.active_counts().get("ticks") == 1
        # Leaving a stream early cancels it on the owner.
        stream = a.runtime.host.ask_stream(address, 1000)
        assert await anext(stream) == "tick 0"
        await stream.aclose()
        # A deadline ends a stream too.
        with pytest.raises(DeadlineExceeded):
            async for _ in a.runtime.host.ask_stream(address, 1000, timeout=0.2):
                pass


async def test_a_forwarded_call_keeps_its_trace(tmp_path):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with cluster(tmp_path) as (a, b):
        b.cluster.server.tracer = provider.get_tracer("test")
        address = owned_by(a, "b", "record")[0]
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        parent = f"00-{trace_id}-00f067aa0ba902b7-01"
        incoming = TraceContextTextMapPropagator().extract({"traceparent": parent})
        token = otel_context.attach(incoming)
        try:
            assert await a.runtime.host.ask(address, "traced") == "traced"
        finally:
            otel_context.detach(token)
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["agentd.forwarded.ask"]
    assert format(spans[0].context.trace_id, "032x") == trace_id
    assert format(spans[0].parent.span_id, "016x") == "00f067aa0ba902b7"
    provider.shutdown()


async def test_a_forwarded_ask_runs_its_turn_in_the_callers_trace(tmp_path):
    # With spans on both nodes: the owner's turn is a child of its forwarded.ask span,
    # which continues the caller's span on the other node (one trace across the hop).
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    async with cluster(tmp_path) as (a, b):
        b.cluster.server.tracer = tracer
        a.runtime.host.spans = b.runtime.host.spans = Spans(tracer)
        address = owned_by(a, "b", "record")[0]
        with tracer.start_as_current_span("caller") as caller:
            assert await a.runtime.host.ask(address, "traced") == "traced"
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"caller", "agentd.forwarded.ask", "agent.turn"}
    assert {s.context.trace_id for s in spans.values()} == {caller.get_span_context().trace_id}
    assert spans["agentd.forwarded.ask"].parent.span_id == caller.get_span_context().span_id
    turn = spans["agent.turn"]
    assert turn.parent.span_id == spans["agentd.forwarded.ask"].context.span_id
    assert turn.attributes["agentd.agent.address"] == str(address)
    provider.shutdown()


async def test_a_forwarded_tells_turn_is_a_child_of_its_senders_span(tmp_path):
    # Two traced turns on node a tell agents on node b (their tells share batches); a tell
    # from outside any trace too. Each told turn on b is a child of the turn that sent it,
    # as for a tell between agents of one node; the untraced one begins a trace of its own.
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    async with cluster(tmp_path) as (a, b):
        a.runtime.host.spans = b.runtime.host.spans = Spans(tracer)
        fans = owned_by(a, "a", "fan", 2)
        targets = owned_by(a, "b", "record", 7)
        lone = targets.pop()
        SEEN.clear()

        async def fan(fan_address: Address, told: list[Address]) -> None:
            with tracer.start_as_current_span(f"caller {fan_address.id}"):
                assert await a.runtime.host.ask(fan_address, told) == len(told)

        await asyncio.gather(fan(fans[0], targets[:3]), fan(fans[1], targets[3:]))
        assert a.runtime.host.tell_nowait(lone, "untraced")
        for _ in range(500):
            turns = [s for s in exporter.get_finished_spans() if s.name == "agent.turn"]
            if len(turns) == 2 + 7:
                break
            await asyncio.sleep(0.01)
    spans = exporter.get_finished_spans()
    by_address = {s.attributes["agentd.agent.address"]: s for s in spans if s.name == "agent.turn"}
    assert len(by_address) == 2 + 7, sorted(by_address)
    for fan_address, told in ((fans[0], targets[:3]), (fans[1], targets[3:])):
        sender = by_address[str(fan_address)]
        for address in told:
            turn = by_address[str(address)]
            assert turn.attributes["agentd.turn.kind"] == "tell"
            assert turn.context.trace_id == sender.context.trace_id
            assert turn.parent.span_id == sender.context.span_id
            assert turn.parent.is_remote
    assert by_address[str(fans[0])].context.trace_id != by_address[str(fans[1])].context.trace_id
    untraced = by_address[str(lone)]
    assert untraced.parent is None
    assert untraced.context.trace_id not in {s.context.trace_id for s in spans if s != untraced}
    provider.shutdown()


async def test_callers_in_flight_get_unavailable_when_the_owner_goes_away(tmp_path):
    async with cluster(tmp_path) as (a, b):
        addresses = owned_by(a, "b", "sleeper", 5)
        calls = [asyncio.ensure_future(a.runtime.host.ask(x, 30.0)) for x in addresses]
        stream_address = owned_by(a, "b", "ticks")[0]

        async def read_stream() -> list[Any]:
            return [e async for e in a.runtime.host.ask_stream(stream_address, 10_000)]

        streaming = asyncio.ensure_future(read_stream())
        async with asyncio.timeout(5):
            while b.runtime.host.active_counts().get("sleeper", 0) < 5:
                await asyncio.sleep(0.01)
        started = time.monotonic()
        await b.cluster.server.aclose()  # the owner's peer server goes away mid-call
        results = await asyncio.gather(*calls, streaming, return_exceptions=True)
        assert time.monotonic() - started < 2.0
        for result in results:
            assert isinstance(result, Unavailable), result
        # The owner is gone: a new call never leaves, so it is tried again (the owner may be
        # restarting) until its deadline is near, then fails with UNAVAILABLE, never hangs.
        started = time.monotonic()
        with pytest.raises(Unavailable, match="node b is unreachable"):
            await a.runtime.host.ask(addresses[0], 0.0, timeout=1.0)
        assert 0.5 < time.monotonic() - started < 2.0


async def test_a_stateless_type_runs_where_the_call_arrives(tmp_path):
    """echo is stateless: asked on the node that does not own its address, it runs there and
    nothing crosses to the owner; a stateful type at an address of the same owner is
    forwarded."""
    async with cluster(tmp_path) as (a, b):
        echo = owned_by(a, "b", "echo")[0]
        _, reply = await a.runtime.invoke(echo, Message(text="hello"))
        assert reply.text == "hello"
        assert await a.runtime.host.ask(echo, "again") == "again"
        assert a.runtime.host.tell_nowait(echo, "told")
        await asyncio.sleep(0.05)  # a tell that crossed would have arrived by now
        assert a.runtime.host.active_counts().get("echo") == 1
        assert b.runtime.host.active_counts().get("echo", 0) == 0
        assert a.cluster.forwarder.client("b").frames_sent == 0
        assert b.cluster.server.frames_received == 0
        # The stateful type is forwarded to b.
        record = owned_by(a, "b", "record")[0]
        assert await a.runtime.host.ask(record, "stateful") == "stateful"
        assert b.runtime.host.active_counts().get("record") == 1
        assert a.runtime.host.active_counts().get("record", 0) == 0
        assert b.cluster.server.frames_received == 1


def _samples(node: Node) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The node's /metrics text parsed back: (sample name, labels) -> value."""
    text, _ = node.metrics.render()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


async def test_the_cluster_metrics_count_what_was_forwarded(tmp_path):
    async with cluster(tmp_path) as (a, b):
        records = owned_by(a, "b", "record", 30)
        for address in records[:20]:
            assert await a.runtime.host.ask(address, "ask") == "ask"
        for address in records:
            for i in range(5):
                assert a.runtime.host.tell_nowait(address, i)
        missing = owned_by(a, "b", "missing", 3)
        for address in missing:
            with pytest.raises(NotFound):
                await a.runtime.host.ask(address, 1)
        events = [e async for e in a.runtime.host.ask_stream(owned_by(a, "b", "ticks")[0], 2)]
        assert len(events) == 2
        async with asyncio.timeout(10):  # the 150 tells arrived
            while sum(len(SEEN.get(str(x), [])) for x in records) < 20 + 150:
                await asyncio.sleep(0.01)
        # Calls b made to its own agents are not forwarded: they add nothing.
        assert await b.runtime.host.ask(records[0], "local") == "local"
        seen = _samples(a)
        ask_ok = (("kind", "ask"), ("outcome", "ok"))
        assert seen[("agentd_cluster_forwarded_seconds_count", ask_ok)] == 20
        not_found = (("kind", "ask"), ("outcome", "NOT_FOUND"))
        assert seen[("agentd_cluster_forwarded_seconds_count", not_found)] == 3
        stream_ok = (("kind", "stream"), ("outcome", "ok"))
        assert seen[("agentd_cluster_forwarded_seconds_count", stream_ok)] == 1
        assert seen[("agentd_cluster_forwarded_seconds_sum", ask_ok)] > 0
        assert seen[("agentd_cluster_forwarded_tells_total", ())] == 150
        batches = seen[("agentd_cluster_forwarded_tell_batches_total", ())]
        assert 1 <= batches <= 150
        # The owner forwarded nothing.
        on_b = _samples(b)
        assert not any(
            name == "agentd_cluster_forwarded_seconds_count" and value
            for (name, _), value in on_b.items()
        )
        assert on_b[("agentd_cluster_forwarded_tells_total", ())] == 0
