"""OpenTelemetry tracing: W3C ``traceparent`` in, spans out through OTLP when configured.

Configured the standard way (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_TRACES_SAMPLER``,
``OTEL_SERVICE_NAME``, ...; see :func:`tracing_config`), with agentd's own ``otlp_endpoint``
and ``service_name`` settings winning when given. Without an endpoint (or with
``OTEL_SDK_DISABLED=true``) the tracer is OpenTelemetry's no-op one and the SDK is never
imported, so an unconfigured node pays almost nothing; the incoming trace context is still
made current for the request.
"""

from __future__ import annotations

import os
import random
import socket
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from opentelemetry.trace.propagation import _SPAN_KEY
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from agentd.settings import Settings

__all__ = [
    "SAMPLERS",
    "Tracing",
    "TracingConfig",
    "UnsampledSpan",
    "current_span",
    "current_traceparent",
    "sampled_trace_id",
    "traced",
    "tracing_config",
]

_PROPAGATOR = TraceContextTextMapPropagator()

# The samplers the OpenTelemetry SDK knows by name (OTEL_TRACES_SAMPLER).
SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
PROTOCOLS = ("http/protobuf", "grpc")


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """Where and how one process exports spans; ``endpoint`` None means tracing is off."""

    endpoint: str | None = None
    protocol: str = "http/protobuf"
    headers: tuple[tuple[str, str], ...] = ()
    timeout_s: float | None = None
    sampler: str = "parentbased_always_on"
    ratio: float = 1.0
    resource: Mapping[str, str] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return self.endpoint is not None


def tracing_config(settings: Settings, environ: Mapping[str, str] | None = None) -> TracingConfig:
    """The tracing configuration of ``settings`` and the ``OTEL_*`` variables of ``environ``
    (default ``os.environ``). Raises ValueError with one line naming the bad variable."""
    env = os.environ if environ is None else environ

    def get(*names: str) -> tuple[str, str] | None:
        # The first of ``names`` set to something (a signal-specific name before the general).
        for name in names:
            value = env.get(name, "").strip()
            if value:
                return name, value
        return None

    disabled = get("OTEL_SDK_DISABLED")
    if disabled is not None and disabled[1].lower() not in ("true", "false"):
        raise ValueError(f"OTEL_SDK_DISABLED must be true or false, not {disabled[1][:60]!r}")
    protocol_var = get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
    protocol = protocol_var[1] if protocol_var else "http/protobuf"
    if protocol not in PROTOCOLS:
        raise ValueError(
            f"{protocol_var[0] if protocol_var else 'protocol'} must be http/protobuf or grpc, "
            f"not {protocol[:60]!r}"
        )
    endpoint = _endpoint(settings, protocol, get)
    headers = _headers(get("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"))
    timeout_s = None
    timeout = get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT")
    if timeout is not None:
        timeout_s = _number(timeout, 0.0, None)
    sampler_var = get("OTEL_TRACES_SAMPLER")
    sampler = sampler_var[1].lower() if sampler_var else "parentbased_always_on"
    if sampler not in SAMPLERS:
        raise ValueError(
            f"OTEL_TRACES_SAMPLER must be one of {', '.join(SAMPLERS)}, not {sampler[:60]!r}"
        )
    ratio = 1.0
    arg = get("OTEL_TRACES_SAMPLER_ARG")
    if sampler.endswith("traceidratio") and arg is not None:
        ratio = _number(arg, 0.0, 1.0)
    resource = _resource(settings, get)
    if disabled is not None and disabled[1].lower() == "true":
        endpoint = None  # the standard off switch: wins over any endpoint
    return TracingConfig(endpoint, protocol, headers, timeout_s, sampler, ratio, resource)


def _endpoint(settings: Settings, protocol: str, get: Any) -> str | None:
    """The exporter's endpoint: agentd's ``otlp_endpoint`` (a base URL), else the traces
    endpoint (used as is), else the general one (a base URL); None when none is set."""
    if settings.otlp_endpoint:
        name, value, base = "otlp_endpoint", settings.otlp_endpoint.strip(), True
    else:
        found = get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        base = found is None
        found = found or get("OTEL_EXPORTER_OTLP_ENDPOINT")
        if found is None:
            return None
        name, value = found
    parts = urlsplit(value)
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise ValueError(f"{name} must be an http:// or https:// URL, not {value[:80]!r}")
    if protocol == "grpc":
        return value  # the gRPC exporter takes scheme://host:port (http: without TLS)
    if base and not parts.path.rstrip("/").endswith("/v1/traces"):
        value = value.rstrip("/") + "/v1/traces"
    return value


def _headers(found: tuple[str, str] | None) -> tuple[tuple[str, str], ...]:
    # W3C baggage-like: key=value pairs, comma-separated, values URL-encoded.
    if found is None:
        return ()
    name, value = found
    headers = []
    for item in value.split(","):
        if not item.strip():
            continue
        key, sep, text = item.partition("=")
        key = unquote(key).strip().lower()
        if not sep or not key or any(c.isspace() or c in ':()<>@;"/[]?={}' for c in key):
            raise ValueError(f"{name} must be key=value pairs joined by commas (got {item[:40]!r})")
        headers.append((key, unquote(text).strip()))
    return tuple(headers)


def _number(found: tuple[str, str], low: float, high: float | None) -> float:
    name, value = found
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not low <= number <= (high if high is not None else float("inf")):
        span = f"from {low:g} to {high:g}" if high is not None else f"{low:g} or more"
        raise ValueError(f"{name} must be a number {span}, not {value[:40]!r}")
    return number


def _resource(settings: Settings, get: Any) -> dict[str, str]:
    """service.name and service.instance.id, beside what OTEL_RESOURCE_ATTRIBUTES adds."""
    attributes: dict[str, str] = {}
    found = get("OTEL_RESOURCE_ATTRIBUTES")
    if found is not None:
        for item in found[1].split(","):
            if not item.strip():
                continue
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(
                    f"OTEL_RESOURCE_ATTRIBUTES must be key=value pairs joined by commas "
                    f"(got {item[:40]!r})"
                )
            attributes[unquote(key).strip()] = unquote(value).strip()
    service = get("OTEL_SERVICE_NAME")
    attributes["service.name"] = (
        settings.service_name
        or (service[1] if service else None)
        or attributes.get("service.name")
        or "agentd"
    )
    # One per process (Prometheus' instance): a node id when the node has one (each of
    # --processes N has its own), else host:port. An explicit one wins for a lone process.
    if settings.node_id or settings.processes > 1 or "service.instance.id" not in attributes:
        attributes["service.instance.id"] = _instance_id(settings)
    return attributes


def _instance_id(settings: Settings) -> str:
    # A cluster node's id is unique in its cluster; the p0, p1, ... of --processes N only
    # on its machine and port, so those go after the address.
    if settings.node_id and settings.processes == 1:
        return settings.node_id
    if settings.advertise:
        address = settings.advertise
    else:
        host = settings.host
        if host in ("0.0.0.0", "::", "") or settings.port == 0:
            host = socket.gethostname()
        # Port 0 is chosen by the kernel after the settings are read: the pid tells runs
        # apart.
        address = f"{host}:{settings.port}" if settings.port else f"{host}:pid{os.getpid()}"
    return f"{address}/{settings.node_id}" if settings.node_id else address


_TRACE_ID_LOW = 0xFFFF_FFFF_FFFF_FFFF  # the bits the traceidratio samplers compare
_RANDOM_FLAG = 0x02  # W3C level 2's random-trace-id flag, which the SDK sets on its ids
_FLAGS = (TraceFlags(0), TraceFlags(_RANDOM_FLAG))  # a request the sampler dropped: never 0x01


class UnsampledSpan(NonRecordingSpan):
    """The span of a request :meth:`Tracing.unsampled` decided not to sample: it carries
    the trace id on and records nothing. Its own type so that the layers below tell it
    apart in one check (no flag reading on the path every dropped request takes)."""


def current_span(context: Context | None = None) -> object:
    """The span in ``context`` (default: the current one), or None: what
    ``trace.get_current_span`` finds, without its fallback, for the checks made on every
    turn and call."""
    if context is None:
        context = otel_context.get_current()
    return context.get(_SPAN_KEY)


class Tracing:
    """Owns the tracer provider of one process; ``aclose`` flushes pending spans."""

    def __init__(self, config: TracingConfig | None = None) -> None:
        self.config = config or TracingConfig()
        self._provider: Any = None
        if not self.config.enabled:
            self.tracer: trace.Tracer = trace.NoOpTracer()
            return
        # Imported here: the SDK and exporter cost start-up time when tracing is off.
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace import sampling as s
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        config = self.config
        samplers: dict[str, Any] = {
            "always_on": lambda: s.ALWAYS_ON,
            "always_off": lambda: s.ALWAYS_OFF,
            "traceidratio": lambda: s.TraceIdRatioBased(config.ratio),
            "parentbased_always_on": lambda: s.DEFAULT_ON,
            "parentbased_always_off": lambda: s.DEFAULT_OFF,
            "parentbased_traceidratio": lambda: s.ParentBasedTraceIdRatio(config.ratio),
        }
        self._ids = _PresetTraceIds()
        self._provider = TracerProvider(
            resource=Resource.create(dict(config.resource)),
            sampler=samplers[config.sampler](),
            # Duck-typed: subclassing the SDK's IdGenerator would import the SDK with tracing off.
            id_generator=self._ids,  # type: ignore[arg-type]
        )
        self._provider.add_span_processor(BatchSpanProcessor(_exporter(config)))
        self.tracer = self._provider.get_tracer("agentd")
        self._parent_based = config.sampler.startswith("parentbased")
        # The decision request() makes without the SDK: the same as the SDK's samplers
        # (ParentBased with its default delegates, TraceIdRatioBased's bound).
        self._root_on = config.sampler.endswith("always_on")
        self._root_off = config.sampler.endswith("always_off")
        self._bound = s.TraceIdRatioBased.get_bound_for_rate(config.ratio)

    @classmethod
    def from_settings(cls, settings: Settings) -> Tracing:
        """The tracing ``settings`` and the ``OTEL_*`` variables configure (see
        :func:`tracing_config`; the settings validated them already)."""
        return cls(tracing_config(settings))

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

    def unsampled(self, parent: Context | None) -> Context | None:
        """Decide whether a request under ``parent`` (the caller's context; None: it begins
        a trace) is sampled, before any span exists (tracing on only).

        Not sampled: the context to run the request in, a non-recording span with the
        trace id (the caller's, or a new one) and the not-sampled flag, so that what the
        request causes (turns, a call to another node) follows the decision and records
        nothing; no SDK span is made. Every sampler agentd configures decides the same for
        the spans under it (the parent-based ones follow it, the ratio ones compare the
        same trace id, always_off says no; always_on never drops), so
        :class:`~agentd.observability.spans.Spans` skips the SDK below such a span.
        Sampled: None, and the next trace this thread begins gets the id just decided on
        (start the request's span right away).
        """
        parent_context = (
            trace.get_current_span(parent).get_span_context() if parent is not None else None
        )
        if parent_context is not None and parent_context.is_valid:
            trace_id = parent_context.trace_id
            flags = parent_context.trace_flags & _RANDOM_FLAG
            if self._parent_based:
                sampled = parent_context.trace_flags.sampled
            else:
                sampled = self._root_decision(trace_id)
            state = parent_context.trace_state
        else:
            trace_id = _random_trace_id()
            flags = _RANDOM_FLAG
            sampled = self._root_decision(trace_id)
            state = None
            if sampled:
                self._ids.preset(trace_id)
        if sampled:
            return None
        span_context = SpanContext(
            trace_id, random.getrandbits(64) or 1, False, _FLAGS[flags >> 1], state
        )
        # As trace.set_span_in_context(span, parent), without its look-up of the current
        # context when there is no parent (every request without a traceparent).
        span = UnsampledSpan(span_context)
        return Context({**parent, _SPAN_KEY: span} if parent else {_SPAN_KEY: span})

    def _root_decision(self, trace_id: int) -> bool:
        if self._root_on:
            return True
        if self._root_off:
            return False
        return trace_id & _TRACE_ID_LOW < self._bound

    def aclose(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()


def _random_trace_id() -> int:
    # As the SDK's RandomIdGenerator: 128 random bits, never the invalid id 0.
    return random.getrandbits(128) or 1


class _PresetTraceIds:
    """The SDK's id generator: random ids, except a trace id :meth:`Tracing.unsampled`
    decided on (a sampled request's), handed to the next root span of the same thread so
    that the SDK's sampler sees the id the decision was made for."""

    def __init__(self) -> None:
        self._local = threading.local()

    def preset(self, trace_id: int) -> None:
        self._local.trace_id = trace_id

    def generate_trace_id(self) -> int:
        local = self._local
        trace_id = getattr(local, "trace_id", 0)
        if trace_id:
            local.trace_id = 0
            return trace_id
        return _random_trace_id()

    @staticmethod
    def generate_span_id() -> int:
        return random.getrandbits(64) or 1

    @staticmethod
    def is_trace_id_random() -> bool:
        return True


def _exporter(config: TracingConfig) -> Any:
    # Each protocol's exporter is imported only when chosen (gRPC's pulls in grpcio).
    headers = dict(config.headers) or None
    if config.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(config.endpoint, headers=headers, timeout=config.timeout_s)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpSpanExporter,
    )

    return HttpSpanExporter(config.endpoint, headers=headers, timeout=config.timeout_s)


def sampled_trace_id(context: Context | None = None) -> str | None:
    """The trace id (32 hex digits) of the span in ``context`` (default: the current one)
    when its trace is sampled (exported somewhere: worth an exemplar), else None."""
    span = current_span(context)
    if span is None or type(span) is UnsampledSpan:  # the common cases, checked first
        return None
    span_context = trace.get_current_span(context).get_span_context()
    if span_context.trace_flags.sampled and span_context.is_valid:
        return format(span_context.trace_id, "032x")
    return None


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
