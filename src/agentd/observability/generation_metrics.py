"""Prometheus metrics of token generation (the token engine's EngineObserver).

Tokens/s is ``rate(agentd_lm_tokens_generated_total[1m])``.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

__all__ = ["GenerationMetrics"]

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# engine gauge key -> (metric name, help)
_GAUGES = {
    "active": ("agentd_lm_sequences_active", "Sequences in the decode batch."),
    "waiting": ("agentd_lm_sequences_waiting", "Sequences queued for cache blocks or a slot."),
    "blocks_free": ("agentd_lm_kv_blocks_free", "KV-cache blocks free in the pool."),
    "blocks_used": ("agentd_lm_kv_blocks_used", "KV-cache blocks lent to sequences."),
}
# engine counter key -> (metric name without _total, help): running totals the engine keeps.
_COUNTERS = {
    "prefix_cache_queries": (
        "agentd_generate_prefix_cache_queries",
        "Prompt tokens of sequences admitted with the prefix cache on.",
    ),
    "prefix_cache_hits": (
        "agentd_generate_prefix_cache_hits",
        "Prompt tokens found in the prefix cache (not computed again).",
    ),
}


class _EngineCollector:
    def __init__(self, read: Callable[[], dict[str, dict[str, float]]]) -> None:
        self._read = read

    def describe(self) -> list:
        return []

    def collect(self):
        per_model = self._read()
        for key, (name, help_text) in _GAUGES.items():
            family = GaugeMetricFamily(name, help_text, labels=["model"])
            for model, values in per_model.items():
                family.add_metric([model], values.get(key, 0))
            yield family
        for key, (name, help_text) in _COUNTERS.items():
            counter = CounterMetricFamily(name, help_text, labels=["model"])
            for model, values in per_model.items():
                if key in values:  # engines without a prefix cache report none
                    counter.add_metric([model], values[key])
            yield counter


class GenerationMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self._ttft = Histogram(
            "agentd_lm_time_to_first_token_seconds",
            "From request to its first generated token.",
            ["model"],
            buckets=_SECONDS,
            registry=registry,
        )
        self._gap = Histogram(
            "agentd_lm_inter_token_seconds",
            "Time between consecutive tokens of one sequence.",
            ["model"],
            buckets=_SECONDS,
            registry=registry,
        )
        self._tokens = Counter(
            "agentd_lm_tokens_generated", "Tokens generated.", ["model"], registry=registry
        )
        self._sequences = Counter(
            "agentd_lm_sequences",
            "Sequences ended, by reason (stop, length, cancelled).",
            ["model", "reason"],
            registry=registry,
        )
        self._registry = registry
        # Per-model children, looked up once: token_gap runs for every token.
        self._per_model: dict[str, tuple] = {}

    def _children(self, model: str) -> tuple:
        children = self._per_model.get(model)
        if children is None:
            children = self._per_model[model] = (
                self._ttft.labels(model),
                self._gap.labels(model),
                self._tokens.labels(model),
            )
        return children

    def first_token(self, model: str, seconds: float) -> None:
        ttft, _, tokens = self._children(model)
        ttft.observe(seconds)
        tokens.inc()

    def token_gap(self, model: str, seconds: float) -> None:
        _, gap, tokens = self._children(model)
        gap.observe(seconds)
        tokens.inc()

    def sequence_finished(self, model: str, reason: str, tokens: int) -> None:
        self._sequences.labels(model, reason).inc()

    def watch(self, read: Callable[[], dict[str, dict[str, float]]]) -> None:
        """Expose the engines' gauges, read at scrape time: {model: {key: value}}."""
        self._registry.register(_EngineCollector(read))
