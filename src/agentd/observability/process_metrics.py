"""Process health metrics: CPython GC pauses and event-loop lag (docs/observability.md).

Both say why latency moved when nothing in agentd's own counters did: a long full
collection stops every agent at once, and a loop that wakes late delays every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from bisect import bisect_left
from time import perf_counter

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

__all__ = ["GcPauses", "LoopLag"]

# The 1-2.5-5 series of agentd's latency histograms (metrics.py), 0.5 ms to 30 s; here
# because metrics.py imports this module.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
# A gen-0 pass takes tens of microseconds, a full one on a large heap up to seconds.
GC_BUCKETS = (0.00005, 0.0001, 0.00025, *LATENCY_BUCKETS[:-3])
LAG_BUCKETS = LATENCY_BUCKETS[1:-1]  # 1 ms to 10 s
_LE = tuple(floatToGoString(bound) for bound in (*GC_BUCKETS, float("inf")))
_GENERATIONS = ("0", "1", "2")


class GcPauses:
    """Times each collection through ``gc.callbacks`` into ``agentd_gc_pause_seconds``.

    The callback runs on every collection, so it does no more than a clock read, a bisect
    and two list updates: no lock (the collector never runs two collections at once, so
    two callbacks never overlap) and no prometheus_client child. The histogram is built
    from the counts at scrape time.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._started = 0.0
        # Per generation: a count per bucket (the last is +Inf), not cumulative.
        self._counts = [[0] * (len(GC_BUCKETS) + 1) for _ in _GENERATIONS]
        self._sums = [0.0] * len(_GENERATIONS)
        self._installed = False
        registry.register(self)

    def describe(self) -> list:
        return []

    def collect(self):
        family = HistogramMetricFamily(
            "agentd_gc_pause_seconds",
            "Time the CPython cyclic garbage collector stopped the process, by generation.",
            labels=["generation"],
        )
        for generation, counts in enumerate(self._counts):
            buckets, total = [], 0
            for bound, count in zip(_LE, counts, strict=True):
                total += count
                buckets.append((bound, total))
            family.add_metric([_GENERATIONS[generation]], buckets, self._sums[generation])
        yield family

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = perf_counter()
            return
        seconds = perf_counter() - self._started
        generation = info["generation"]
        self._counts[generation][bisect_left(GC_BUCKETS, seconds)] += 1
        self._sums[generation] += seconds

    def start(self) -> None:
        """Start timing collections (once; a second call does nothing)."""
        if not self._installed:
            gc.callbacks.append(self._callback)
            self._installed = True

    def stop(self) -> None:
        """Stop timing (the process keeps its other callbacks)."""
        if self._installed:
            with contextlib.suppress(ValueError):
                gc.callbacks.remove(self._callback)
            self._installed = False


class LoopLag:
    """A task on the node's loop that sleeps ``interval`` seconds and records how late it
    woke into ``agentd_event_loop_lag_seconds``: a loop blocked by a slow callback, a
    synchronous call or a long collection wakes late."""

    def __init__(self, registry: CollectorRegistry, interval: float = 0.5) -> None:
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._lag = Histogram(
            "agentd_event_loop_lag_seconds",
            "How late the event loop ran a timer that was due (sampled every 0.5 s).",
            buckets=LAG_BUCKETS,
            registry=registry,
        )

    def start(self) -> None:
        """Start sampling on the running loop (once)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._sample(), name="agentd-loop-lag"
            )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _sample(self) -> None:
        loop = asyncio.get_running_loop()
        observe = self._lag.observe
        interval = self.interval
        while True:
            due = loop.time() + interval
            await asyncio.sleep(interval)
            # The loop may run a timer up to its clock resolution early: never negative.
            observe(max(loop.time() - due, 0.0))
