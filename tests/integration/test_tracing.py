"""OpenTelemetry: spans exported over OTLP/HTTP carry the caller's W3C trace context."""

from __future__ import annotations

import http.server
import threading
import time
import typing

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from agentd.testing import start_server
from agentd.v1 import agent_pb2 as pb
from agentd.v1 import agent_pb2_grpc as pb_grpc

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


class _Collector(http.server.BaseHTTPRequestHandler):
    spans: typing.ClassVar[list] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                _Collector.spans.extend(scope_spans.spans)
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def collector():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def traced(collector):
    running = start_server(env={"AGENTD_OTLP_ENDPOINT": collector, "OTEL_BSP_SCHEDULE_DELAY": "50"})
    yield running
    running.stop()


def _wait_for_span(predicate, timeout: float = 10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for span in list(_Collector.spans):
            if predicate(span):
                return span
        time.sleep(0.05)
    raise AssertionError(f"no matching span among {len(_Collector.spans)} exported")


def test_connect_span_continues_incoming_trace(traced):
    r = httpx.post(
        traced.url + "/agentd.v1.AgentService/Invoke",
        json={"agent": "echo"},
        headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
    )
    assert r.status_code == 200
    # (The echo agent's turn is in this trace too, a child of the request's span.)
    span = _wait_for_span(
        lambda s: s.trace_id.hex() == TRACE_ID and s.name == "/agentd.v1.AgentService/Invoke"
    )
    assert span.parent_span_id.hex() == PARENT_ID
    assert span.kind == span.SPAN_KIND_SERVER


def test_grpc_span_without_traceparent_starts_a_trace(traced):
    with grpc.insecure_channel(traced.target) as channel:
        pb_grpc.AgentServiceStub(channel).ListAgents(pb.ListAgentsRequest())
    span = _wait_for_span(lambda s: s.name == "/agentd.v1.AgentService/ListAgents")
    assert len(span.parent_span_id) == 0
    attributes = {a.key: a.value.string_value for a in span.attributes}
    assert attributes["rpc.system"] == "grpc"
    assert attributes["agentd.status"] == "OK"
