"""Observability: Prometheus metrics and OpenTelemetry tracing, used by every layer."""

from agentd.observability.metrics import Metrics
from agentd.observability.tracing import Tracing

__all__ = ["Metrics", "Tracing"]
