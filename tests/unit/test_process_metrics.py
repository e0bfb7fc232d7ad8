"""GC pause and event-loop lag metrics (agentd.observability.process_metrics)."""

from __future__ import annotations

import asyncio
import gc
import time

from prometheus_client import CollectorRegistry, generate_latest

from agentd.observability import Metrics
from tests.conftest import metric_value

PAUSES = "agentd_gc_pause_seconds_count"
LAG_COUNT = "agentd_event_loop_lag_seconds_count"
LAG_SUM = "agentd_event_loop_lag_seconds_sum"


def scrape(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def test_gc_pauses_timed_per_generation_while_started_only() -> None:
    metrics = Metrics()

    async def run() -> None:
        await metrics.start()
        try:
            gc.collect()  # a full (generation 2) collection
            gc.collect(0)
        finally:
            await metrics.aclose()

    asyncio.run(run())
    text = scrape(metrics.registry)
    assert metric_value(text, PAUSES, generation="2") >= 1
    assert metric_value(text, PAUSES, generation="0") >= 1
    assert metric_value(text, "agentd_gc_pause_seconds_sum", generation="2") > 0
    # Every generation is exported, the +Inf bucket equal to the count.
    inf = metric_value(text, "agentd_gc_pause_seconds_bucket", generation="2", le="+Inf")
    assert inf == metric_value(text, PAUSES, generation="2")
    assert 'generation="1"' in text
    # Stopped: the callback left gc.callbacks and collections are no longer counted.
    assert not any(getattr(cb, "__self__", None) is metrics._gc_pauses for cb in gc.callbacks)
    full = metric_value(text, PAUSES, generation="2")
    gc.collect()
    assert metric_value(scrape(metrics.registry), PAUSES, generation="2") == full


def test_loop_lag_records_a_blocked_loop() -> None:
    metrics = Metrics()
    metrics._loop_lag.interval = 0.05

    async def run() -> None:
        await metrics.start()
        try:
            await asyncio.sleep(0.12)  # a few samples of an idle loop
            time.sleep(0.3)  # noqa: ASYNC251 - a synchronous call blocking the loop is the point
            await asyncio.sleep(0.12)
        finally:
            await metrics.aclose()

    asyncio.run(run())
    text = scrape(metrics.registry)
    assert metric_value(text, LAG_COUNT) >= 2
    # The sample that spanned the blocking call woke about 0.25 s late.
    assert metric_value(text, LAG_SUM) >= 0.2
    assert metric_value(text, "agentd_event_loop_lag_seconds_bucket", le="0.1") < metric_value(
        text, LAG_COUNT
    )


def test_turn_latency_exemplar_from_the_current_trace_when_enabled() -> None:
    from opentelemetry import context, trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
    from prometheus_client.openmetrics.exposition import generate_latest as openmetrics

    trace_id = 0x0AF7651916CD43DD8448EB211C80319C
    span = NonRecordingSpan(
        SpanContext(trace_id, 0xB7AD6B7169203331, is_remote=True, trace_flags=TraceFlags(1))
    )
    metrics = Metrics()
    token = context.attach(trace.set_span_in_context(span))
    try:
        metrics.turn_finished("echo", "ok", 0.003)  # exemplars off: none recorded
        assert " # {" not in openmetrics(metrics.registry).decode()
        metrics.trace_exemplars = True
        metrics.turn_finished("echo", "ok", 0.003)
    finally:
        context.detach(token)
    metrics.turn_finished("echo", "ok", 0.003)  # no current trace: a plain observation
    text = openmetrics(metrics.registry).decode()
    lines = [ln for ln in text.splitlines() if " # {" in ln]
    assert len(lines) == 1, lines
    assert lines[0].startswith("agentd_agent_turn_duration_seconds_bucket")
    assert 'trace_id="0af7651916cd43dd8448eb211c80319c"' in lines[0]
    count = 'agentd_agent_turn_duration_seconds_count{agent_type="echo"} 3.0'
    assert count in text
