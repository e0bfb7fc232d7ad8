"""OpenTelemetry tracing: W3C ``traceparent`` in, spans out through OTLP when configured.

Without an OTLP endpoint the tracer is OpenTelemetry's no-op one, so an unconfigured node
pays almost nothing; the incoming trace context is still made current for the request.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["Tracing", "current_trace_id", "current_traceparent", "trace_id_of", "traced"]

_PROPAGATOR = TraceContextTextMapPropagator()


class Tracing:
    """Owns the tracer provider of one process; ``aclose`` flushes pending spans."""

    def __init__(self, service_name: str, otlp_endpoint: str | None) -> None:
        self._provider = None
        if otlp_endpoint:
            # Imported here: the SDK and exporter cost start-up time when tracing is off.
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            endpoint = otlp_endpoint.rstrip("/")
            if not endpoint.endswith("/v1/traces"):
                endpoint += "/v1/traces"
            self._provider = TracerProvider(resource=Resource({"service.name": service_name}))
            self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint)))
            self.tracer: trace.Tracer = self._provider.get_tracer("agentd")
        else:
            self.tracer = trace.NoOpTracer()

    @property
    def enabled(self) -> bool:
        return self._provider is not None

    @staticmethod
    def extract(headers: Iterable[tuple[bytes, bytes]]) -> Context | None:
        """The trace context carried by ``traceparent``/``tracestate`` headers, if any."""
        carrier = {}
        for name, value in headers:
            if name in (b"traceparent", b"tracestate"):
                carrier[name.decode("latin-1")] = value.decode("latin-1")
        return _PROPAGATOR.extract(carrier) if carrier else None

    def aclose(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()


def current_trace_id() -> str | None:
    """The current trace's id (32 hex digits), or None when no trace is current."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


def trace_id_of(context: Context) -> str | None:
    """The trace id (32 hex digits) of the span in ``context``, or None."""
    span_context = trace.get_current_span(context).get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else None


def current_traceparent() -> str | None:
    """The W3C ``traceparent`` of the current context (to carry to another node), or None
    when no trace is current."""
    if not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent")


@contextmanager
def traced(traceparent: str | None, tracer: Any = None, name: str = "") -> Iterator[None]:
    """Run the block under the trace context ``traceparent`` (from another node; ignored
    when malformed), in a server span ``name`` when ``tracer`` (an OpenTelemetry tracer)
    is given. Nothing happens without a ``traceparent``."""
    if not traceparent:
        yield
        return
    token = otel_context.attach(_PROPAGATOR.extract({"traceparent": traceparent[:256]}))
    try:
        if tracer is None:
            yield
        else:
            with tracer.start_as_current_span(name, kind=trace.SpanKind.SERVER):
                yield
    finally:
        otel_context.detach(token)
