"""One trace from the request to the model: the spans of one Invoke whose agent calls
ctx.infer, ctx.tool, ctx.generate, ctx.ask and ctx.send, exported over OTLP/HTTP to a
receiver in the test, each with the right parent or link and one trace id throughout."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from tritonclient.grpc import service_pb2, service_pb2_grpc

from agentd.testing import RunningServer, start_server
from tests.conftest import metric_value

INVOKE = "/agentd.v1.AgentService/Invoke"
TRACE_ID = "5bf92f3577b34da6a3ce929d0e0e4737"
PARENT_ID = "10f067aa0ba902b8"

AGENTS = """
import numpy as np

from agentd import Agent


class Planner(Agent):
    name = "planner"
    description = "Calls a model, a tool, a language model and another agent."

    async def handle(self, ctx, message):
        decided = await ctx.infer("decision", {"features": np.zeros((1, 16), np.float32)})
        total = await ctx.tool("calc", {"expression": "6*7"})
        text = "".join([piece async for piece in ctx.generate("hello", max_tokens=4)])
        helped = await ctx.ask("helper/h1", message)
        await ctx.send("helper/h2", message)
        ctx.state["turns"] = ctx.state.get("turns", 0) + 1
        return f"{int(decided['action'][0])} {total} {len(text)} {helped}"


class Helper(Agent):
    name = "helper"
    description = "Answers with a model call of its own."

    async def handle(self, ctx, message):
        await ctx.infer("decision", {"features": np.ones((2, 16), np.float32)})
        return "helped"
"""


class _Receiver(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP trace receiver: decodes each ExportTraceServiceRequest."""

    spans: list[Span] = []  # noqa: RUF012  (shared by the handler's instances)
    lock = threading.Lock()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        request = ExportTraceServiceRequest.FromString(body)
        with _Receiver.lock:
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    _Receiver.spans.extend(scope_spans.spans)
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def receiver() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def node(receiver: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    plugins = tmp_path_factory.mktemp("plugins")
    (plugins / "agents").mkdir()
    (plugins / "agents" / "planner.py").write_text(AGENTS)
    running = start_server(
        ["--plugins", str(plugins)],
        env={"AGENTD_OTLP_ENDPOINT": receiver, "OTEL_BSP_SCHEDULE_DELAY": "50"},
    )
    yield running
    running.stop()


def _attrs(span: Span) -> dict[str, object]:
    values: dict[str, object] = {}
    for attribute in span.attributes:
        value = attribute.value
        kind = value.WhichOneof("value")
        if kind == "array_value":
            values[attribute.key] = [v.string_value for v in value.array_value.values]
        else:
            values[attribute.key] = getattr(value, kind)
    return values


def _wait(predicate: Callable[[list[Span]], bool], timeout: float = 15.0) -> list[Span]:
    end = time.monotonic() + timeout
    while True:
        with _Receiver.lock:
            spans = list(_Receiver.spans)
        if predicate(spans):
            return spans
        assert time.monotonic() < end, sorted(s.name for s in spans)
        time.sleep(0.05)


@pytest.fixture(scope="module")
def tree(node: RunningServer) -> dict[str, object]:
    """Invoke the planner once under a caller's traceparent; the spans it caused."""
    response = httpx.post(
        node.url + INVOKE,
        json={"agent": "planner/p1", "message": {"text": "go"}},
        headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
        timeout=60,
    )
    assert response.status_code == 200, response.text

    def complete(spans: list[Span]) -> bool:
        names = [s.name for s in spans if s.trace_id.hex() == TRACE_ID]
        return (
            names.count("agent.turn") == 3  # planner, helper/h1 (asked), helper/h2 (told)
            and names.count("inference.call") == 3
            and "state.commit" in names
            and {"tool.call", "generate", INVOKE} <= set(names)
            and sum(s.name == "inference.batch" for s in spans) >= 2
        )

    spans = _wait(complete)
    return {"reply": response.json(), "spans": spans}


def _one(spans: list[Span], name: str, **attrs: object) -> Span:
    found = [s for s in spans if s.name == name and _attrs(s).items() >= attrs.items()]
    assert len(found) == 1, (name, attrs, [(s.name, _attrs(s)) for s in found])
    return found[0]


def test_every_span_has_the_right_parent(tree: dict) -> None:
    spans = [s for s in tree["spans"] if s.trace_id.hex() == TRACE_ID]
    request = _one(spans, INVOKE)
    assert request.parent_span_id.hex() == PARENT_ID  # the caller's traceparent continues
    planner = _one(spans, "agent.turn", **{"agentd.agent.address": "planner/p1"})
    asked = _one(spans, "agent.turn", **{"agentd.agent.address": "helper/h1"})
    told = _one(spans, "agent.turn", **{"agentd.agent.address": "helper/h2"})
    assert planner.parent_span_id == request.span_id
    assert asked.parent_span_id == planner.span_id  # ctx.ask: a child of the asking turn
    assert told.parent_span_id == planner.span_id  # ctx.send: a child too
    for name in ("tool.call", "generate", "state.commit"):
        assert _one(spans, name).parent_span_id == planner.span_id, name
    calls = [s for s in spans if s.name == "inference.call"]
    assert sorted(c.parent_span_id for c in calls) == sorted(
        [planner.span_id, asked.span_id, told.span_id]
    )


def test_turn_and_call_attributes(tree: dict) -> None:
    spans = [s for s in tree["spans"] if s.trace_id.hex() == TRACE_ID]
    planner = _attrs(_one(spans, "agent.turn", **{"agentd.agent.address": "planner/p1"}))
    assert planner["agentd.agent.type"] == "planner"
    assert planner["agentd.turn.outcome"] == "ok"
    assert planner["agentd.turn.kind"] == "ask"
    told = _attrs(_one(spans, "agent.turn", **{"agentd.agent.address": "helper/h2"}))
    assert told["agentd.turn.kind"] == "tell"
    tool = _attrs(_one(spans, "tool.call"))
    assert tool["agentd.tool.name"] == "calc"
    assert tool["agentd.tool.outcome"] == "ok"
    assert tool["agentd.tool.fuel_used"] > 0
    assert tool["agentd.tool.sandbox_seconds"] > 0
    generate = _attrs(_one(spans, "generate"))
    assert generate["gen_ai.request.model"] == "tinylm"
    assert generate["gen_ai.usage.input_tokens"] > 0
    assert 1 <= generate["gen_ai.usage.output_tokens"] <= 4
    assert generate["gen_ai.response.finish_reasons"] in (["length"], ["stop"])
    assert generate["agentd.generate.time_to_first_token_seconds"] > 0
    commit = _attrs(_one(spans, "state.commit"))
    assert commit["agentd.state.batch_size"] >= 1
    assert commit["agentd.state.bytes"] > 0
    rows = sorted(_attrs(s)["agentd.inference.rows"] for s in spans if s.name == "inference.call")
    assert rows == [1, 2, 2]


def test_batches_link_to_their_callers(tree: dict) -> None:
    spans = tree["spans"]
    calls = {s.span_id: s for s in spans if s.name == "inference.call"}
    calls = {k: s for k, s in calls.items() if s.trace_id.hex() == TRACE_ID}
    linked: set[bytes] = set()
    for batch in (s for s in spans if s.name == "inference.batch"):
        attributes = _attrs(batch)
        assert attributes["agentd.model"] == "decision"
        assert attributes["agentd.batch.size"] == len(batch.links) >= 1
        assert attributes["agentd.batch.queue_seconds"] >= 0
        assert len(batch.parent_span_id) == 0  # a batch serves many traces: links only
        for link in batch.links:
            if link.trace_id.hex() == TRACE_ID:
                linked.add(link.span_id)
        runs = [s for s in spans if s.name == "inference.run" and s.parent_span_id == batch.span_id]
        assert len(runs) == 1 and runs[0].trace_id == batch.trace_id
    assert linked == set(calls)  # every ctx.infer reached by a link from its batch


def test_turn_latency_exemplar_carries_the_trace(node: RunningServer, tree: dict) -> None:
    text = httpx.get(node.url + "/metrics", headers={"accept": "application/openmetrics-text"}).text
    lines = [
        line
        for line in text.splitlines()
        if line.startswith("agentd_agent_turn_duration_seconds_bucket")
        and 'agent_type="planner"' in line
    ]
    assert any(f'trace_id="{TRACE_ID}"' in line for line in lines), lines
    assert metric_value(text, "agentd_agent_turns_total", agent_type="planner", outcome="ok") >= 1


def _request_tree(trace_id: str, request_name: str, child: str) -> tuple[Span, Span]:
    """The request span of trace ``trace_id`` and its one ``child`` span, once exported."""

    def both(spans: list[Span]) -> bool:
        names = [s.name for s in spans if s.trace_id.hex() == trace_id]
        return request_name in names and child in names

    spans = [s for s in _wait(both) if s.trace_id.hex() == trace_id]
    return _one(spans, request_name), _one(spans, child)


def test_kserve_rest_and_grpc_requests_have_inference_spans(node: RunningServer) -> None:
    rest_trace, grpc_trace = "6bf92f3577b34da6a3ce929d0e0e4738", "7bf92f3577b34da6a3ce929d0e0e4739"
    response = httpx.post(
        node.url + "/v2/models/decision/infer",
        json={
            "inputs": [
                {"name": "features", "datatype": "FP32", "shape": [3, 16], "data": [0.5] * 48}
            ]
        },
        headers={"traceparent": f"00-{rest_trace}-{PARENT_ID}-01"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    request = service_pb2.ModelInferRequest(model_name="decision")
    tensor = request.inputs.add(name="features", datatype="FP32", shape=[1, 16])
    tensor.contents.fp32_contents.extend([0.25] * 16)
    with grpc.insecure_channel(node.target) as channel:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, metadata=[("traceparent", f"00-{grpc_trace}-{PARENT_ID}-01")], timeout=30
        )
    for trace_id, rows in ((rest_trace, 3), (grpc_trace, 1)):
        spans = _wait(
            lambda spans, t=trace_id: any(
                s.name == "inference.call" and s.trace_id.hex() == t for s in spans
            )
        )
        call = _one([s for s in spans if s.trace_id.hex() == trace_id], "inference.call")
        server = [s for s in spans if s.span_id == call.parent_span_id]
        assert len(server) == 1 and server[0].kind == Span.SPAN_KIND_SERVER, trace_id
        assert server[0].parent_span_id.hex() == PARENT_ID
        assert _attrs(call)["agentd.inference.rows"] == rows
        batches = [
            s
            for s in spans
            if s.name == "inference.batch" and any(link.span_id == call.span_id for link in s.links)
        ]
        assert len(batches) == 1


def test_openai_completion_has_a_generate_span(node: RunningServer) -> None:
    trace_id = "8bf92f3577b34da6a3ce929d0e0e473a"
    response = httpx.post(
        node.url + "/v1/completions",
        json={"model": "tinylm", "prompt": "once", "max_tokens": 3, "stream": True},
        headers={"traceparent": f"00-{trace_id}-{PARENT_ID}-01"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    request, generate = _request_tree(trace_id, "/v1/completions", "generate")
    assert generate.parent_span_id == request.span_id
    attributes = _attrs(generate)
    assert attributes["gen_ai.usage.output_tokens"] == 3
    assert attributes["gen_ai.response.finish_reasons"] == ["length"]
    assert attributes["agentd.generate.time_to_first_token_seconds"] > 0
