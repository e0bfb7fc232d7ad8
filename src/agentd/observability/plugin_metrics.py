"""Prometheus metrics of plugin reloads (docs/plugins.md).

The plugin manager and its handlers report through :class:`PluginMetrics` (or
:data:`NO_METRICS`, which records nothing, where a node keeps no metrics registry).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

__all__ = ["NO_METRICS", "PluginMetrics", "PluginObserver"]

_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0)


class PluginObserver:
    """What plugin reloads report; this base records nothing."""

    def reloaded(self, kind: str, outcome: str, seconds: float) -> None:
        """One reload of a ``kind`` plugin (agents, tools, ...) ended with ``outcome`` (ok,
        removed, failed, refused) after ``seconds``."""


NO_METRICS = PluginObserver()


class PluginMetrics(PluginObserver):
    def __init__(self, registry: CollectorRegistry) -> None:
        self._reloads = Counter(
            "agentd_plugin_reloads",
            "Plugin reloads, by kind and outcome (ok, removed, failed, refused).",
            ["kind", "outcome"],
            registry=registry,
        )
        self._seconds = Histogram(
            "agentd_plugin_reload_seconds",
            "Time to reload one plugin: read, verify, import, check and swap.",
            ["kind"],
            buckets=_SECONDS,
            registry=registry,
        )

    def reloaded(self, kind: str, outcome: str, seconds: float) -> None:
        self._reloads.labels(kind, outcome).inc()
        self._seconds.labels(kind).observe(seconds)
