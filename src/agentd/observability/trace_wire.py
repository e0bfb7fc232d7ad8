"""A trace context in 25 bytes, for tells that cross nodes in batches (agentd.cluster.codec):
the W3C ``traceparent``'s fields in binary (trace id 16 bytes, span id 8, flags 1, big
endian as the hex form reads), against 55 characters as text.

Only this package imports OpenTelemetry: the cluster's peer connections hold the contexts
as opaque objects and use these functions.
"""

from __future__ import annotations

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

__all__ = ["SIZE", "attach", "detach", "pack", "unpack"]

SIZE = 25
_EMPTY = Context()


def pack(context: object) -> bytes | None:
    """The 25 bytes of the span in ``context`` (a context from ``Spans.current``), or None
    when it holds no valid span (no trace: nothing to carry)."""
    span_context = trace.get_current_span(context).get_span_context()  # type: ignore[arg-type]
    if not span_context.is_valid:
        return None
    return (
        span_context.trace_id.to_bytes(16, "big")
        + span_context.span_id.to_bytes(8, "big")
        + bytes((span_context.trace_flags & 0xFF,))
    )


def unpack(raw: bytes) -> object:
    """The context whose current span is the remote span ``raw`` (from :func:`pack`) names:
    a turn started under it is that span's child. ValueError when ``raw`` is no such
    context (the codec checks this already)."""
    span_context = SpanContext(
        int.from_bytes(raw[:16], "big"),
        int.from_bytes(raw[16:24], "big"),
        is_remote=True,
        trace_flags=TraceFlags(raw[24]),
    )
    if len(raw) != SIZE or not span_context.is_valid:
        raise ValueError("not a packed trace context")
    return trace.set_span_in_context(NonRecordingSpan(span_context), _EMPTY)


def attach(context: object) -> object:
    """Make ``context`` (from :func:`unpack`) current; returns the token for :func:`detach`."""
    return otel_context.attach(context)  # type: ignore[arg-type]


def detach(token: object) -> None:
    """Restore the context current before :func:`attach` gave ``token``."""
    otel_context.detach(token)  # type: ignore[arg-type]
