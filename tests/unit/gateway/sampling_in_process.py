"""Sampling decided once per request, through the gateway in process (ASGI) with a real
node: a request the sampler drops makes no SDK span at all (the sampler is never asked
below it) and leaves no exemplar; its trace id still reaches the turn; a sampled request's
span gets the trace id the decision was made on. Run by test_sampling.py in a fresh
interpreter (as routing_in_process.py: the gateway's KServe protos)."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics

from agentd import Agent
from agentd.agents import AgentRegistry
from agentd.gateway.app import Gateway
from agentd.node import Node
from agentd.settings import Settings
from agentd.testing import AsgiLifespan, asgi_request
from agentd.v1 import agent_pb2 as pb

GRPC = {"content-type": "application/grpc", "te": "trailers"}
INVOKE = "/agentd.v1.AgentService/Invoke"
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


class Seer(Agent):
    """Answers with the trace id current in its turn, and asks ``echo`` (a nested turn)."""

    name = "seer"

    async def handle(self, ctx, message):
        span_context = trace.get_current_span().get_span_context()
        await ctx.ask("echo/x", "hi")
        return format(span_context.trace_id, "032x") if span_context.is_valid else "none"


class Echo(Agent):
    name = "echo"

    async def handle(self, ctx, message):
        ctx.state["n"] = ctx.state.get("n", 0) + 1  # a state commit: its span too
        return message


class _Sink(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def sink() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


class _Counting:
    """The tracer's sampler, counting how often the SDK asks it (once per SDK span)."""

    def __init__(self, sampler) -> None:
        self.sampler = sampler
        self.asked = 0

    def should_sample(self, *args, **kwargs):
        self.asked += 1
        return self.sampler.should_sample(*args, **kwargs)

    def get_description(self) -> str:
        return self.sampler.get_description()


def _gateway(tmp_path, sink: str, monkeypatch, ratio: float):
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", str(ratio))
    registry = AgentRegistry()
    registry.register(Seer)
    registry.register(Echo)
    settings = Settings(
        otlp_endpoint=sink, state_path=tmp_path / "agents.db", tools_cache_dir=tmp_path / "t"
    )
    gateway = Gateway(Node(settings, registry=registry))
    exporter = InMemorySpanExporter()
    gateway.tracing._provider.add_span_processor(SimpleSpanProcessor(exporter))
    counting = _Counting(gateway.tracing.tracer.sampler)
    gateway.tracing.tracer.sampler = counting
    return gateway, exporter, counting


async def _invoke(gateway, traceparent: str | None = None) -> str:
    headers = dict(GRPC)
    if traceparent:
        headers["traceparent"] = traceparent
    request = pb.InvokeRequest(agent="seer/a", message=pb.Message(text="x"))
    data = request.SerializeToString()
    body = b"\x00" + len(data).to_bytes(4, "big") + data
    response = await asgi_request(gateway, "POST", INVOKE, headers=headers, body=body)
    assert response.grpc_status == 0, response.messages
    reply = pb.InvokeResponse.FromString(response.body[5:])
    return reply.message.text


def _exemplars(gateway) -> list[str]:
    text = openmetrics(gateway.metrics.registry).decode()
    return [line for line in text.splitlines() if " # {" in line]


async def test_a_dropped_request_makes_no_span_and_no_exemplar(tmp_path, sink, monkeypatch):
    gateway, exporter, counting = _gateway(tmp_path, sink, monkeypatch, 0.0)
    async with AsgiLifespan(gateway):
        seen = [await _invoke(gateway) for _ in range(5)]
        # The caller's not-sampled decision is followed, and its trace id goes on.
        caller = await _invoke(gateway, f"00-{CALLER_TRACE}-00f067aa0ba902b7-00")
    assert counting.asked == 0  # no SDK span was started: request, turns, commits
    assert exporter.get_finished_spans() == ()
    assert _exemplars(gateway) == []  # none pointing at a trace that was never exported
    # Each request still ran in a trace of its own (logs carry it; a call to another node
    # would carry it with the not-sampled flag).
    assert "none" not in seen and len(set(seen)) == 5
    assert caller == CALLER_TRACE


async def test_a_sampled_request_is_traced_under_the_id_it_was_decided_on(
    tmp_path, sink, monkeypatch
):
    gateway, exporter, _ = _gateway(tmp_path, sink, monkeypatch, 0.5)
    async with AsgiLifespan(gateway):
        seen = [await _invoke(gateway) for _ in range(40)]
    spans = exporter.get_finished_spans()
    requests = {format(s.context.trace_id, "032x") for s in spans if s.name == INVOKE}
    bound = TraceIdRatioBased.get_bound_for_rate(0.5)
    assert 0 < len(requests) < 40  # some kept, some dropped (2 * 2**-40 to fail by chance)
    for trace_id in requests:
        assert int(trace_id, 16) & 0xFFFF_FFFF_FFFF_FFFF < bound  # the decision's id
    # Each kept request: its span, both turns and the commit, in its trace; the dropped
    # ones: nothing.
    for trace_id in requests:
        names = sorted(s.name for s in spans if format(s.context.trace_id, "032x") == trace_id)
        assert names == [INVOKE, "agent.turn", "agent.turn", "state.commit"], names
    assert {format(s.context.trace_id, "032x") for s in spans} == requests
    assert requests <= set(seen)
    exemplar_ids = {ln.split('trace_id="')[1][:32] for ln in _exemplars(gateway)}
    assert exemplar_ids and exemplar_ids <= requests


async def test_a_caller_sampled_request_is_traced_at_ratio_0(tmp_path, sink, monkeypatch):
    gateway, exporter, _ = _gateway(tmp_path, sink, monkeypatch, 0.0)
    async with AsgiLifespan(gateway):
        seen = await _invoke(gateway, f"00-{CALLER_TRACE}-00f067aa0ba902b7-01")
    assert seen == CALLER_TRACE
    spans = exporter.get_finished_spans()
    assert sorted(s.name for s in spans) == [INVOKE, "agent.turn", "agent.turn", "state.commit"]
    assert {format(s.context.trace_id, "032x") for s in spans} == {CALLER_TRACE}
