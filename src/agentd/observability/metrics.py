"""Prometheus metrics: one registry per process, owned by the app, never global."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics

from agentd.observability.process_metrics import LATENCY_BUCKETS, GcPauses, LoopLag
from agentd.observability.tracing import sampled_trace_id

if TYPE_CHECKING:
    from agentd.tools.admission import AdmissionStats

__all__ = ["Metrics"]

_RUNTIME_SERIES = (
    ("active_agents", "gauge", "agentd_agents_active", "Agent instances in memory."),
    ("passivated_agents", "counter", "agentd_agents_passivated", "Agents passivated."),
    ("messages_waiting", "gauge", "agentd_mailbox_messages", "Messages waiting in mailboxes."),
    ("pool_queued", "gauge", "agentd_pool_queue_depth", "Agents waiting for a worker."),
    ("pool_busy", "gauge", "agentd_pool_busy_workers", "Workers running a turn."),
    ("pool_rejected", "counter", "agentd_pool_rejections", "Messages refused: queue full."),
    ("state_writes", "counter", "agentd_state_writes", "Agent state rows written."),
    ("state_commits", "counter", "agentd_state_commits", "State store transactions."),
    ("state_errors", "counter", "agentd_state_store_errors", "State store commits that failed."),
    (
        "state_failing",
        "gauge",
        "agentd_state_store_failing",
        "1 while state store commits fail (then /readyz answers 503), else 0.",
    ),
)


class _RuntimeCollector:
    def __init__(self, read: Callable[[], dict[str, float]]) -> None:
        self._read = read

    def describe(self) -> list:
        return []

    def collect(self):
        values = self._read()
        for key, kind, name, help_text in _RUNTIME_SERIES:
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(name, help_text, value=values.get(key, 0))


class _ToolAdmissionCollector:
    """The tool scheduler's gauges, read at scrape time from the latest service watched."""

    def __init__(self, read: Callable[[], AdmissionStats]) -> None:
        self.read = read

    def describe(self) -> list:
        return []

    def collect(self):
        stats = self.read()
        queued = GaugeMetricFamily(
            "agentd_tool_calls_queued", "Tool calls waiting for a thread, by tool.", labels=["tool"]
        )
        for tool, count in sorted(stats.queued_per_tool.items()):
            queued.add_metric([tool], count)
        yield queued
        running = GaugeMetricFamily(
            "agentd_tool_calls_running",
            "Tool calls holding a thread (until it is free), by tool.",
            labels=["tool"],
        )
        for tool, count in sorted(stats.running_per_tool.items()):
            running.add_metric([tool], count)
        yield running
        yield GaugeMetricFamily(
            "agentd_tool_memory_reserved_bytes",
            "Sandbox memory the running tool calls reserve (their per-call limit each).",
            value=stats.memory_reserved_bytes,
        )
        yield CounterMetricFamily(
            "agentd_tool_queue_rejections",
            "Tool calls refused because a queue was full.",
            value=stats.num_rejected,
        )


class Metrics:
    """All of agentd's metrics. Label children are cached: lookups sit on the hot path."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._requests = Counter(
            "agentd_requests",
            "Requests handled, by protocol, method and status code.",
            ["protocol", "method", "code"],
            registry=r,
        )
        self._errors = Counter(
            "agentd_request_errors",
            "Requests that ended in an error status.",
            ["protocol", "method", "code"],
            registry=r,
        )
        self._latency = Histogram(
            "agentd_request_duration_seconds",
            "Request latency from first byte to last.",
            ["protocol", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._in_flight = Gauge(
            "agentd_requests_in_flight",
            "Requests being handled now.",
            ["protocol"],
            registry=r,
        )
        self._turns = Counter(
            "agentd_agent_turns",
            "Agent turns, by agent type and outcome.",
            ["agent_type", "outcome"],
            registry=r,
        )
        self._turn_latency = Histogram(
            "agentd_agent_turn_duration_seconds",
            "Agent turn latency.",
            ["agent_type"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._infer_requests = Counter(
            "agentd_inference_requests",
            "Inference requests run, by model.",
            ["model"],
            registry=r,
        )
        self._infer_failures = Counter(
            "agentd_inference_failures",
            "Inference requests whose batch failed, by model.",
            ["model"],
            registry=r,
        )
        self._batch_size = Histogram(
            "agentd_inference_batch_size",
            "Rows per executor run.",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
            registry=r,
        )
        self._queue_time = Histogram(
            "agentd_inference_queue_seconds",
            "Time a request waited for its batch.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._compute_time = Histogram(
            "agentd_inference_compute_seconds",
            "Executor time per batch.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._tool_calls = Counter(
            "agentd_tool_calls",
            "Sandboxed tool calls, by tool and outcome (ok or the error kind).",
            ["tool", "outcome"],
            registry=r,
        )
        self._tool_errors = Counter(
            "agentd_tool_errors",
            "Tool calls that failed, by tool and kind (raised, out_of_fuel, deadline, ...).",
            ["tool", "kind"],
            registry=r,
        )
        self._tool_latency = Histogram(
            "agentd_tool_call_duration_seconds",
            "Tool call time in the sandbox (instance, call, result).",
            ["tool"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._tool_fuel = Histogram(
            "agentd_tool_fuel_used",
            "Fuel (wasmtime instruction budget) a tool call used.",
            ["tool"],
            buckets=(1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11),
            registry=r,
        )
        self._tool_queue_wait = Histogram(
            "agentd_tool_queue_wait_seconds",
            "Time a tool call waited for its turn before it started.",
            ["tool"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._tool_admission: _ToolAdmissionCollector | None = None
        self._children: dict[tuple, object] = {}
        self._gc_pauses = GcPauses(r)
        # Whether turns look up the current trace for an exemplar: set where tracing is
        # on (the gateway's Observe), so an untraced node pays nothing per turn.
        self.trace_exemplars = False
        self._loop_lag = LoopLag(r)

    def describe_target(self, resource: Mapping[str, str]) -> None:
        """Export ``target_info``: the resource attributes the node's spans carry
        (service.name, service.instance.id, OTEL_RESOURCE_ATTRIBUTES) as labels, once (the
        OpenTelemetry convention, to join this target's series to its traces)."""
        labels: dict[str, str] = {}
        for key in sorted(resource):
            name = _label_name(key)
            # Two attributes sanitized to one name: both values, as the convention says.
            labels[name] = f"{labels[name]};{resource[key]}" if name in labels else resource[key]
        Info("target", "The node's OpenTelemetry resource.", registry=self.registry).info(labels)

    async def start(self) -> None:
        """Start the process samplers: GC pause timing and the event-loop lag task (on the
        running loop). The node starts its metrics first and closes them last."""
        self._gc_pauses.start()
        self._loop_lag.start()

    async def aclose(self) -> None:
        """Stop the samplers (the GC callback leaves ``gc.callbacks``). Idempotent."""
        self._gc_pauses.stop()
        await self._loop_lag.stop()

    def _child(self, metric, *labels: str):
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def request_started(self, protocol: str) -> None:
        self._child(self._in_flight, protocol).inc()

    def request_finished(
        self,
        protocol: str,
        method: str,
        code: str,
        seconds: float,
        *,
        error: bool,
        trace_id: str | None = None,
    ) -> None:
        """One request ended; ``trace_id`` (32 hex digits) when it was traced becomes the
        latency observation's exemplar."""
        self._child(self._in_flight, protocol).dec()
        self._child(self._requests, protocol, method, code).inc()
        if error:
            self._child(self._errors, protocol, method, code).inc()
        self._child(self._latency, protocol, method).observe(
            seconds, None if trace_id is None else {"trace_id": trace_id}
        )

    def turn_finished(self, agent_type: str, outcome: str, seconds: float) -> None:
        """One agent turn ended; with :attr:`trace_exemplars` on, a turn run inside a
        trace gets the trace id as its latency exemplar."""
        self._child(self._turns, agent_type, outcome).inc()
        trace_id = sampled_trace_id() if self.trace_exemplars else None
        self._child(self._turn_latency, agent_type).observe(
            seconds, None if trace_id is None else {"trace_id": trace_id}
        )

    def batch_finished(
        self,
        model: str,
        rows: int,
        queue_seconds: Sequence[float],
        compute_seconds: float,
        ok: bool,
    ) -> None:
        self._child(self._infer_requests, model).inc(len(queue_seconds))
        if not ok:
            self._child(self._infer_failures, model).inc(len(queue_seconds))
        self._child(self._batch_size, model).observe(rows)
        queue = self._child(self._queue_time, model)
        for seconds in queue_seconds:
            queue.observe(seconds)
        self._child(self._compute_time, model).observe(compute_seconds)

    def tool_call_finished(self, tool: str, outcome: str, seconds: float, fuel: int) -> None:
        """One tool call ended (on any thread): ``outcome`` is "ok" or an error kind."""
        self._child(self._tool_calls, tool, outcome).inc()
        if outcome != "ok":
            self._child(self._tool_errors, tool, outcome).inc()
        self._child(self._tool_latency, tool).observe(seconds)
        if fuel:
            self._child(self._tool_fuel, tool).observe(fuel)

    def tool_call_started(self, tool: str, waited_s: float) -> None:
        """A tool call got its thread after waiting ``waited_s`` (on the event loop)."""
        self._child(self._tool_queue_wait, tool).observe(waited_s)

    def watch_tool_admission(self, read: Callable[[], AdmissionStats]) -> None:
        """Expose the tool scheduler's statistics, read from ``read()`` at scrape time; a
        later call replaces the reader (one tool service per node)."""
        if self._tool_admission is None:
            self._tool_admission = _ToolAdmissionCollector(read)
            self.registry.register(self._tool_admission)
        else:
            self._tool_admission.read = read

    def watch_runtime(self, read: Callable[[], dict[str, float]]) -> None:
        """Expose the runtime's gauges and counters, read from ``read()`` at scrape time.

        ``read`` returns: active_agents, passivated_agents, messages_waiting, pool_queued,
        pool_busy, pool_rejected, state_writes, state_commits, state_errors, state_failing.
        """
        self.registry.register(_RuntimeCollector(read))

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition and its content type: OpenMetrics (with the latency histograms'
        exemplars) when ``accept`` (the scraper's Accept header) names
        ``application/openmetrics-text``, else Prometheus text (which has no exemplars)."""
        if accept and _wants_openmetrics(accept):
            return openmetrics.generate_latest(self.registry), openmetrics.CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _label_name(key: str) -> str:
    """A resource attribute's name as a label name (service.name: service_name)."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", key)
    if not name or name[0].isdigit() or name.startswith("__"):
        name = "key_" + name  # a leading digit is invalid, "__" reserved
    return name


def _wants_openmetrics(accept: str) -> bool:
    # Prometheus asks "application/openmetrics-text;version=1.0.0,...,text/plain;q=0.5":
    # any media range naming OpenMetrics with a non-zero quality wins.
    for media_range in accept[:1024].split(","):
        media_type, *params = media_range.split(";")
        if media_type.strip().lower() != "application/openmetrics-text":
            continue
        quality = next((p.split("=", 1)[1] for p in params if p.strip().startswith("q=")), "1")
        try:
            if float(quality) > 0:
                return True
        except ValueError:
            continue  # a malformed q: that range does not count
    return False
