"""Tracing configured by OTEL_* variables: a real serve exports to a receiver in the test
over OTLP/HTTP and over OTLP/gRPC; parent-based ratio sampling; the resource; JSON logs."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as ts_grpc

from agentd.testing import start_server

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
FAST = {"OTEL_BSP_SCHEDULE_DELAY": "50"}  # export within 50 ms, not 5 s


class Received:
    """What a receiver got: (resource attributes, span) pairs and each request's headers."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict[str, str], object]] = []
        self.headers: list[dict[str, str]] = []
        self._lock = threading.Lock()

    def add(self, request: ts.ExportTraceServiceRequest, headers: dict[str, str]) -> None:
        with self._lock:
            self.headers.append(headers)
            for resource_spans in request.resource_spans:
                attributes = {
                    a.key: a.value.string_value for a in resource_spans.resource.attributes
                }
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend((attributes, span) for span in scope_spans.spans)

    def wait_for(self, predicate: Callable[[object], bool], timeout: float = 15.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                for attributes, span in self.spans:
                    if predicate(span):
                        return attributes, span
            time.sleep(0.05)
        raise AssertionError(f"no matching span among {len(self.spans)} received")


@pytest.fixture
def http_receiver() -> Iterator[tuple[str, Received]]:
    received = Received()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            received.add(ts.ExportTraceServiceRequest.FromString(body), dict(self.headers))
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", received
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def grpc_receiver() -> Iterator[tuple[str, Received]]:
    received = Received()

    class TraceService(ts_grpc.TraceServiceServicer):
        def Export(self, request, context):
            received.add(request, dict(context.invocation_metadata()))
            return ts.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(2))
    ts_grpc.add_TraceServiceServicer_to_server(TraceService(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"http://127.0.0.1:{port}", received
    server.stop(0)


def test_http_export_resource_headers_and_json_logs(http_receiver) -> None:
    endpoint, received = http_receiver
    port = _free_port()  # not 0: the instance id is host:port, known before the bind
    running = start_server(
        ["--log-format", "json", "--port", str(port)],
        env={
            **FAST,
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=s%3Dcret",
            "OTEL_SERVICE_NAME": "agents-prod",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test",
        },
        timeout=60,
    )
    try:
        # A log line inside a traced request: the model admin's "loaded" line.
        loaded = httpx.post(
            running.url + "/v2/repository/models/decision/load",
            headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
            timeout=30,
        )
        assert loaded.status_code == 200, loaded.text
        attributes, span = received.wait_for(lambda s: s.trace_id.hex() == TRACE_ID)
        assert span.parent_span_id.hex() == PARENT_ID
        assert attributes["service.name"] == "agents-prod"
        assert attributes["service.instance.id"] == f"127.0.0.1:{port}"
        assert attributes["deployment.environment"] == "test"
        assert received.headers[0]["x-api-key"] == "s=cret"
        lines = _json_lines(running, lambda line: "loaded from" in line.get("message", ""))
        assert lines, running.log()
        assert lines[-1]["trace_id"] == TRACE_ID
        assert len(lines[-1]["span_id"]) == 16 and lines[-1]["level"] == "info"
        assert lines[-1]["logger"] == "agentd.inference.repository"
    finally:
        running.stop()


def test_grpc_export_parent_based_ratio(grpc_receiver) -> None:
    endpoint, received = grpc_receiver
    running = start_server(
        env={
            **FAST,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0",
            "OTEL_SERVICE_NAME": "ignored",
            "AGENTD_SERVICE_NAME": "agentd-own",  # agentd's setting wins
        },
        timeout=60,
    )
    try:
        with httpx.Client(base_url=running.url, timeout=30) as client:
            for _ in range(5):  # ratio 0: a new trace is never sampled
                r = client.post("/agentd.v1.AgentService/ListAgents", json={})
                assert r.status_code == 200
            # A sampled parent is followed (parent-based), whatever the ratio.
            r = client.post(
                "/agentd.v1.AgentService/ListAgents",
                json={},
                headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
            )
            assert r.status_code == 200
        attributes, span = received.wait_for(lambda s: s.trace_id.hex() == TRACE_ID)
        assert attributes["service.name"] == "agentd-own"
        assert span.parent_span_id.hex() == PARENT_ID
        time.sleep(0.3)  # the batch processor exports in order: nothing else follows
        assert {s.trace_id.hex() for _, s in received.spans} == {TRACE_ID}
    finally:
        running.stop()


def test_bad_variable_is_one_line_exit_2() -> None:
    with pytest.raises(RuntimeError) as caught:
        start_server(env={"OTEL_TRACES_SAMPLER_ARG": "half", "OTEL_TRACES_SAMPLER": "traceidratio"})
    assert "error: invalid settings: OTEL_TRACES_SAMPLER_ARG must be a number" in str(caught.value)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _json_lines(running, predicate, timeout: float = 10.0) -> list[dict]:
    end = time.monotonic() + timeout
    while True:
        found = []
        for text in running.log().splitlines():
            if text.startswith("{"):
                line = json.loads(text)  # every JSON-looking line must parse
                if predicate(line):
                    found.append(line)
        if found or time.monotonic() > end:
            return found
        time.sleep(0.1)
