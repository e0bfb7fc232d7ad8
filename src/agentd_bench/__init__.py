"""Benchmark suites behind ``agentd bench``; each writes JSON to ``benchmarks/results/``.

A package of its own, outside the runtime package ``agentd``: it needs FastAPI, uvicorn,
grpcio, matplotlib and tritonclient (the ``bench`` extra), none of which agentd needs to
serve. ``agentd bench`` reaches it through the ``agentd.bench`` entry point
(:func:`load_suite`), so nothing in ``agentd`` imports it.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["EXTRA_MODULES", "SUITES", "load_suite", "missing_extra"]

# Suite name -> "module:function"; imported only when that suite runs.
SUITES: dict[str, str] = {
    "gateway": "agentd_bench.gateway:run_suite",
    "inference": "agentd_bench.inference:run_suite",
    "swarm": "agentd_bench.swarm:run_suite",
    "generate": "agentd_bench.generate:run_suite",
    "tools": "agentd_bench.tools:run_suite",
    "soak": "agentd_bench.soak:run_suite",
    "cluster": "agentd_bench.cluster:run_suite",
    "reload": "agentd_bench.reload:run_suite",
}

# The modules the ``bench`` extra in pyproject.toml installs (top-level names): peer servers
# (FastAPI on uvicorn with httptools, grpc.aio), clients (tritonclient), model building
# (onnx, safetensors) and the soak's plot (matplotlib).
EXTRA_MODULES = (
    "fastapi",
    "uvicorn",
    "httptools",
    "grpc",
    "tritonclient",
    "onnx",
    "safetensors",
    "matplotlib",
)


def missing_extra() -> list[str]:
    """The modules of :data:`EXTRA_MODULES` that cannot be found. Found, not imported: the
    check must not load FastAPI or matplotlib into the process that measures."""
    missing = []
    for name in EXTRA_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken package, or a module without a spec
            found = False
        if not found:
            missing.append(name)
    return missing


def load_suite(suite: str, results_dir: Path | None = None) -> Callable[..., Any]:
    """Check what a run needs, then import ``suite`` and return its ``run_suite``.

    Checked up front, so a run is refused before it measures anything: the results folder
    (:class:`~agentd_bench.results.ResultsDirError`, an ``InvalidArgument``) and the bench
    extra (:class:`~agentd_bench.errors.MissingExtra`, a ``FailedPrecondition``).
    """
    from agentd_bench.errors import BenchError, MissingExtra
    from agentd_bench.results import check_results_dir

    target = SUITES.get(suite)
    if target is None:
        raise BenchError(f"unknown suite {suite!r}; choose from: {', '.join(SUITES)}")
    check_results_dir(results_dir)
    missing = missing_extra()
    if missing:
        raise MissingExtra(missing)
    module_name, func_name = target.split(":")
    return getattr(importlib.import_module(module_name), func_name)
