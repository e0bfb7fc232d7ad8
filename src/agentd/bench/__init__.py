"""Benchmark suites behind ``agentd bench``; each writes JSON to ``benchmarks/results/``."""

from __future__ import annotations

__all__ = ["SUITES"]

# Suite name -> "module:function"; imported only when that suite runs.
SUITES: dict[str, str] = {
    "gateway": "agentd.bench.gateway:run_suite",
    "inference": "agentd.bench.inference:run_suite",
    "swarm": "agentd.bench.swarm:run_suite",
    "generate": "agentd.bench.generate:run_suite",
    "tools": "agentd.bench.tools:run_suite",
    "soak": "agentd.bench.soak:run_suite",
}
