"""Per-request observation: metrics, a span, and the status a response ended with."""

from __future__ import annotations

import time
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from agentd.errors import Code
from agentd.gateway.asgi import PROTOCOL, ROUTE, ASGIApp, Receive, Scope, Send
from agentd.gateway.detach import client_gone
from agentd.gateway.protocol import Protocol
from agentd.observability import Metrics, Tracing
from agentd.observability.tracing import sampled_trace_id

__all__ = ["Observe", "StatusRecorder"]
_CODE_NAMES = {code.value: code.name for code in Code}
_CODE_NAMES[0] = "OK"


class StatusRecorder:
    """Wraps ``send`` and remembers the HTTP status and any gRPC status sent.

    gRPC carries its status in trailers (or in the headers of a trailers-only response);
    gRPC-Web carries trailers in a final body frame flagged 0x80.

    It is the one wrapper every send of every request passes through, so it is also where
    a send to a client that left becomes :class:`~agentd.gateway.detach.ClientGone`
    (raises it; see :func:`~agentd.gateway.detach.client_gone`).
    """

    __slots__ = ("_grpc_web", "_send", "grpc_status", "http_status")

    def __init__(self, send: Send, *, grpc_web: bool = False) -> None:
        self._send = send
        self._grpc_web = grpc_web
        self.http_status = 0
        self.grpc_status: int | None = None

    async def __call__(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.http_status = message["status"]
            self._scan(message.get("headers", ()))
        elif kind == "http.response.trailers":
            self._scan(message.get("headers", ()))
        elif self._grpc_web and kind == "http.response.body" and not message.get("more_body"):
            self._scan_web_trailer(message.get("body", b""))
        try:
            await self._send(message)
        except OSError as exc:  # the server's ClientDisconnectedError is one
            raise client_gone(exc) from None

    def _scan(self, headers: Any) -> None:
        for name, value in headers:
            if name == b"grpc-status":
                try:
                    self.grpc_status = int(value)
                except ValueError:
                    self.grpc_status = Code.UNKNOWN.value

    def _scan_web_trailer(self, body: bytes) -> None:
        start = body.rfind(b"\x80")
        if start < 0:
            return
        for line in body[start + 5 :].split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"grpc-status":
                self._scan([(b"grpc-status", value.strip())])

    def outcome(self) -> tuple[str, bool]:
        """The ``code`` label and whether it is an error."""
        if self.grpc_status is not None:
            return _CODE_NAMES.get(self.grpc_status, str(self.grpc_status)), self.grpc_status != 0
        if self.http_status == 0:
            return "aborted", True
        return str(self.http_status), self.http_status >= 400


class Observe:
    """Middleware: counts each request in flight and when done (by protocol, route label
    and status code, with its duration), and runs it in a server span named by its route
    label when tracing is on, under the caller's ``traceparent`` when it sent one.

    The sampling decision is made once, before any span: a request the sampler drops runs
    in a non-recording context (its trace id travels on, nothing is recorded, no exemplar),
    at about the cost of tracing off (docs/observability.md, "What tracing costs")."""

    __slots__ = ("_app", "_attributes", "_metrics", "_tracing")

    def __init__(self, app: ASGIApp, metrics: Metrics, tracing: Tracing) -> None:
        self._app = app
        self._metrics = metrics
        self._tracing = tracing
        # Where requests are traced, turns look up their trace for latency exemplars too.
        metrics.trace_exemplars = metrics.trace_exemplars or tracing.enabled
        # Each protocol's span attributes, made once (the SDK copies them into the span).
        self._attributes = {protocol: {"rpc.system": str(protocol)} for protocol in Protocol}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        protocol: Protocol = scope[PROTOCOL]
        metrics = self._metrics
        tracing = self._tracing
        metrics.request_started(protocol)
        recorder = StatusRecorder(send, grpc_web=protocol is Protocol.GRPC_WEB)
        started = time.perf_counter()
        token = None
        span = None
        trace_id = None  # the latency exemplar's, when the request's trace is sampled
        parent = tracing.extract(scope["headers"]) if _has_trace(scope) else None
        if tracing.enabled:
            unsampled = tracing.unsampled(parent)
            if unsampled is None:
                span = tracing.tracer.start_span(
                    scope[ROUTE].label,
                    context=parent,
                    kind=SpanKind.SERVER,
                    attributes=self._attributes[protocol],
                )
                trace_id = format(span.get_span_context().trace_id, "032x")
                token = otel_context.attach(trace.set_span_in_context(span, parent))
            else:
                token = otel_context.attach(unsampled)
        elif parent is not None:
            token = otel_context.attach(parent)
            trace_id = sampled_trace_id(parent)
        try:
            await self._app(scope, receive, recorder)
        except Exception as exc:
            if span is not None:  # as OpenTelemetry's start_as_current_span records it
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            raise
        finally:
            if token is not None:
                otel_context.detach(token)
            code, error = recorder.outcome()
            if span is not None:
                span.set_attribute("agentd.status", code)
                span.end()
            metrics.request_finished(
                protocol,
                scope[ROUTE].label,
                code,
                time.perf_counter() - started,
                error=error,
                trace_id=trace_id,
            )


def _has_trace(scope: Scope) -> bool:
    return any(name == b"traceparent" for name, _ in scope["headers"])
