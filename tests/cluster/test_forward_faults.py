"""Forwarding under load and abuse: backpressure across the socket with nothing lost, and
hostile bytes on a peer socket close that connection without harming the node."""

from __future__ import annotations

import asyncio
import socket
import struct

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agentd.agents.address import Address
from agentd.cluster import codec
from agentd.cluster.peer import ASK, REPLY, TELLS
from agentd.observability.spans import Spans
from tests.cluster.test_forwarding import SEEN, cluster, owned_by


async def test_a_burst_of_100k_tells_to_a_slow_owner_arrives_whole(tmp_path):
    # A small run queue on the owner: it fills at once and stops reading the socket.
    SEEN.clear()  # shared with test_forwarding's tests, which may run first
    async with cluster(tmp_path, workers=2, max_queued_turns=16) as (a, b):
        targets = owned_by(a, "b", "record", 2000)
        host = a.runtime.host
        async with asyncio.timeout(60):
            for round_ in range(50):
                for address in targets:
                    if not host.tell_nowait(address, (round_, 0)):
                        await host.tell(address, (round_, 0))
            while sum(map(len, SEEN.values())) < 100_000:
                await asyncio.sleep(0.02)
        assert sum(map(len, SEEN.values())) == 100_000
        for address in targets:
            assert SEEN[str(address)] == [(r, 0) for r in range(50)]  # in order, none lost
        assert b.cluster.server.pauses > 0  # the owner pushed back
        client = a.cluster.forwarder.client("b")
        assert client.tells_lost == 0
        assert client.frames_sent < 1000  # batched


async def test_traced_tells_held_back_by_a_full_owner_keep_their_trace(tmp_path):
    # The owner's run queue fills at once: most tells wait in its paused reader, then are
    # told one by one as room frees up; each still runs as a child of its sender's turn.
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    SEEN.clear()
    async with cluster(tmp_path, workers=2, max_queued_turns=4) as (a, b):
        a.runtime.host.spans = b.runtime.host.spans = Spans(tracer)
        fan = owned_by(a, "a", "fan")[0]
        targets = owned_by(a, "b", "record", 300)
        with tracer.start_as_current_span("caller"):
            assert await a.runtime.host.ask(fan, targets) == 300
        async with asyncio.timeout(60):
            while sum(map(len, SEEN.values())) < 300:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.05)  # the last turns' spans end after their handlers
        assert b.cluster.server.pauses > 0
    turns = [s for s in exporter.get_finished_spans() if s.name == "agent.turn"]
    (sender,) = [s for s in turns if s.attributes["agentd.agent.type"] == "fan"]
    told = [s for s in turns if s.attributes["agentd.agent.type"] == "record"]
    assert len(told) == 300
    assert {s.parent.span_id for s in told} == {sender.context.span_id}
    assert {s.context.trace_id for s in told} == {sender.context.trace_id}
    provider.shutdown()


def _frame(kind: int, body: bytes, call: int = 0, size: int | None = None) -> bytes:
    return struct.pack("<IBQ", len(body) + 9 if size is None else size, kind, call) + body


HOSTILE = [
    b"\x00" * 13,  # a frame too short for its own head
    _frame(99, b""),  # an unknown kind
    _frame(TELLS, b"", size=2**31),  # far over the size limit
    _frame(TELLS, b"\x01\x00\x00\x00garbage"),  # a batch that does not decode
    _frame(TELLS, codec.encode_tells([], [])[:-1] + b"\x07"),
    # A traced tell whose trace context has a zero trace id.
    _frame(
        TELLS,
        codec.encode_tells([Address("record", "x1")], [1], [bytes(range(1, 26))]).replace(
            bytes(range(1, 17)), bytes(16)
        ),
    ),
]


async def test_hostile_bytes_on_the_peer_socket_close_that_connection_only(tmp_path):
    async with cluster(tmp_path) as (a, b):
        address = owned_by(a, "b", "record")[0]
        assert await a.runtime.host.ask(address, 1) == 1
        loop = asyncio.get_running_loop()
        for data in HOSTILE:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            await loop.sock_connect(sock, f"{tmp_path}/b.sock")
            await loop.sock_sendall(sock, data)
            async with asyncio.timeout(5):
                assert await loop.sock_recv(sock, 100) == b""  # closed by the node
            sock.close()
        # An ask whose message does not decode gets an error reply, not a closed socket.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        await loop.sock_connect(sock, f"{tmp_path}/b.sock")
        await loop.sock_sendall(sock, _frame(ASK, b"t\x04\x00\x00\x00Z", call=5))
        async with asyncio.timeout(5):
            head = await loop.sock_recv(sock, 13)
        _, kind, call = struct.unpack("<IBQ", head)
        assert (kind, call) == (REPLY, 5)
        sock.close()
        # The node serves on, to its peers and locally.
        assert await a.runtime.host.ask(address, 2) == 2
        assert await b.runtime.host.ask(address, 3) == 3


def test_forwarding_works_on_uvloop_and_the_benchmark_reports_it():
    # agentd serves on uvloop, whose transports are not asyncio.Transport subclasses.
    from agentd_bench.forwarding import measure_forwarding

    result = measure_forwarding(n=50)
    for scheme in ("unix", "tcp"):
        assert result[scheme]["forwarded"]["p50_ms"] > 0
        assert result[scheme]["local"]["p50_ms"] > 0
    assert result["codec_batch_4096"]["int_pairs_ms"] > 0
