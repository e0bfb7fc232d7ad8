"""``agentd bench tools``: the WASM tool sandbox against a process per call, in one run.

Measured in process, on the machine's cores, with the built-in ``echo`` tool as the
trivial tool (and ``calc("1 + 1")`` for a tool that parses its input):

* per-call latency through :class:`ToolService` (thread hop, instance, call, JSON) at one
  call in flight: with instances prepared ahead (the default) and with a fresh instance
  made inside each call, both on a :class:`SandboxEngine` with wasmtime's pooling
  allocator sized as a node sizes it, and prepared instances on an engine without the pool
  (wasmtime's on-demand allocator: an ``mmap``/``munmap`` per instance); and the bare
  sandbox call without the service;
* calls/s with 16 calls in flight, and the CPU (user + system, all threads) per call;
* cold build (componentize-py + wasmtime precompile) and warm start (load the cached
  artefact, first call), and a rebuild of unchanged files;
* the baseline: ``python -I`` started per call, running the same function, sequential and
  with as many in flight as there are cores.

Targets: p50 per-call latency <= 2 ms; >= 10x the baseline (latency and calls/s); CPU per
call <= 0.5 ms.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from agentd.tools.build import build_tools
from agentd.tools.builtin import echo as echo_module
from agentd.tools.sandbox import SandboxEngine, WasmSandbox
from agentd.tools.service import ToolService
from agentd.tools.types import ToolLimits
from agentd_bench.errors import BenchError
from agentd_bench.results import machine_info, package_versions, run_and_publish

__all__ = ["BenchError", "run_suite"]

SUITE = "tools"
TARGET_P50_MS = 2.0
TARGET_RATIO = 10.0
TARGET_CPU_MS = 0.5
TOOL = "echo"
ARGUMENTS = {"value": "hello"}
EXPECTED: object = "hello"
WORK_TOOL = "calc"
WORK_ARGUMENTS = {"expression": "1 + 1"}
BASELINE_SCRIPT = Path(__file__).parent / "baselines" / "tool_subprocess.py"


@dataclass(frozen=True, slots=True)
class SuiteConfig:
    latency_calls: int
    throughput_calls: int
    in_flight: int
    baseline_calls: int
    warm_starts: int
    cold_build: bool


FULL = SuiteConfig(2000, 4000, 16, 60, 5, cold_build=True)
# Quick: the suite's test of the bench itself (every point runs, nothing is concluded).
QUICK = SuiteConfig(50, 100, 16, 4, 1, cold_build=False)


def _percentiles(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)

    def rank(p: float) -> float:
        return ordered[max(0, min(len(ordered) - 1, round(p * len(ordered)) - 1))] * 1000

    return {
        "p50_ms": round(rank(0.50), 3),
        "p90_ms": round(rank(0.90), 3),
        "p99_ms": round(rank(0.99), 3),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 3),
    }


def _service(
    artefact_path: Path, specs: list, *, pool_size: int, pooled: bool
) -> tuple[ToolService, SandboxEngine]:
    limits = ToolLimits()
    threads = max(4, 2 * (os.cpu_count() or 1))
    if pooled:  # as a node sizes it (one component here: the built-ins)
        engine = SandboxEngine.for_node(limits, threads=threads, pool_size=pool_size, components=1)
    else:
        engine = SandboxEngine(max_instances=0)
    service = ToolService(
        specs,
        lambda: WasmSandbox(artefact_path, limits, pool_size=pool_size, engine=engine),
        limits=limits,
        threads=threads,
        # One tool is measured: let it use every thread (a node gives one tool half).
        max_running_per_tool=threads,
    )
    return service, engine


async def _latency(
    service: ToolService, calls: int, tool: str = TOOL, arguments: dict = ARGUMENTS
) -> dict[str, Any]:
    for _ in range(20):  # warm-up: threads started, instances prepared
        await service.call(tool, arguments)
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        await service.call(tool, arguments)
        times.append(time.perf_counter() - started)
        # Between calls a prepared instance is made ready again, as on an idle server.
        await asyncio.sleep(0.001)
    return {"calls": calls, **_percentiles(times)}


async def _throughput(service: ToolService, calls: int, in_flight: int) -> dict[str, Any]:
    remaining = calls
    times: list[float] = []

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            await service.call(TOOL, ARGUMENTS)
            times.append(time.perf_counter() - started)

    cpu_before = os.times()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    wall = time.perf_counter() - started
    cpu_after = os.times()
    cpu = (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system)
    return {
        "calls": calls,
        "in_flight": in_flight,
        "wall_s": round(wall, 3),
        "calls_per_s": round(calls / wall, 1),
        # This process's CPU per call (user + system, all threads): what a call costs
        # whatever else shares the machine.
        "cpu_ms_per_call": round(cpu / calls * 1000, 3),
        **_percentiles(times),
    }


def _sandbox_only(artefact_path: Path, calls: int) -> dict[str, Any]:
    box = WasmSandbox(artefact_path, ToolLimits(), pool_size=0)
    arguments = json.dumps(ARGUMENTS)
    try:
        for _ in range(20):
            box.call(TOOL, arguments)
        times, fuel = [], 0
        for _ in range(calls):
            started = time.perf_counter()
            outcome = box.call(TOOL, arguments)
            times.append(time.perf_counter() - started)
            fuel = outcome.fuel_used
    finally:
        box.close()
    return {"calls": calls, "fuel_per_call": fuel, **_percentiles(times)}


def _warm_start(artefact_path: Path, specs: list, repeats: int) -> dict[str, Any]:
    """Load the cached artefact (engine, mmap of the native code, linker) and make one call,
    as a server start does."""
    loads, firsts = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        box = WasmSandbox(artefact_path, ToolLimits())
        loaded = time.perf_counter()
        box.call(TOOL, json.dumps(ARGUMENTS))
        done = time.perf_counter()
        box.close()
        loads.append(loaded - started)
        firsts.append(done - started)
    return {
        "load_ms_median": round(statistics.median(loads) * 1000, 2),
        "load_and_first_call_ms_median": round(statistics.median(firsts) * 1000, 2),
        "repeats": repeats,
    }


def _baseline_call() -> float:
    request = json.dumps({"file": echo_module.__file__, "name": TOOL, "arguments": ARGUMENTS})
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-I", str(BASELINE_SCRIPT)],
        input=request,
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0 or json.loads(done.stdout or "null") != EXPECTED:
        raise BenchError(f"baseline call failed: {done.stderr[-500:]}")
    return elapsed


def _baseline(calls: int) -> dict[str, Any]:
    _baseline_call()
    sequential = [_baseline_call() for _ in range(calls)]
    in_flight = os.cpu_count() or 1
    cpu_before = os.times()
    started = time.perf_counter()
    with ThreadPoolExecutor(in_flight) as pool:
        concurrent = list(pool.map(lambda _: _baseline_call(), range(calls)))
    wall = time.perf_counter() - started
    cpu_after = os.times()
    cpu = sum(
        getattr(cpu_after, f) - getattr(cpu_before, f)
        for f in ("user", "system", "children_user", "children_system")
    )
    return {
        "command": f"{Path(sys.executable).name} -I {BASELINE_SCRIPT.name} (one process per call)",
        "sequential": {"calls": calls, **_percentiles(sequential)},
        "throughput": {
            "calls": calls,
            "in_flight": in_flight,
            "wall_s": round(wall, 3),
            "calls_per_s": round(calls / wall, 1),
            "cpu_ms_per_call": round(cpu / calls * 1000, 3),
            **_percentiles(concurrent),
        },
    }


def collect(config: SuiteConfig, progress: Callable[[str], None]) -> dict[str, Any]:
    load_before = [round(x, 2) for x in os.getloadavg()]
    cache = Path(tempfile.mkdtemp(prefix="agentd-bench-tools-"))
    try:
        if config.cold_build:
            progress("cold build: componentize-py + wasmtime precompile (tens of seconds) ...")
        else:
            progress("building (or finding) the tool component ...")
        from agentd.settings import Settings

        cache_dir = cache if config.cold_build else Settings().tools_cache_dir
        built = build_tools(cache_dir, None)
        artefact = built.artefact
        rebuild = build_tools(cache_dir, None)
        component = artefact.owner(TOOL)
        if component is None:
            raise BenchError(f"the built-in tools have no {TOOL!r} tool")
        manifest = component.manifest
        build = {
            "measured_now": built.built,
            "cold_build_s": round(built.seconds, 2)
            if built.built
            else round(sum(manifest["timings"].values()), 2),
            "steps_s": manifest["timings"],
            "rebuild_unchanged_s": round(rebuild.seconds, 4),
            "component_bytes": manifest["component_bytes"],
            "artefact_bytes": manifest["artefact_bytes"],
        }
        path = component.component_path
        progress("warm start: load the precompiled artefact, first call ...")
        build["warm_start"] = _warm_start(path, artefact.tools, config.warm_starts)
        progress(f"sandbox alone, {config.latency_calls} calls ...")
        bare = _sandbox_only(path, config.latency_calls)

        async def service_points() -> dict[str, Any]:
            points: dict[str, Any] = {}
            for label, pool_size, pooled in (
                ("prepared_instances", 2, True),
                ("fresh_instance_in_call", 0, True),
                ("prepared_instances_no_pool", 2, False),
            ):
                service, engine = _service(path, artefact.tools, pool_size=pool_size, pooled=pooled)
                await service.start()
                try:
                    progress(f"service, {label}: latency, {config.latency_calls} calls ...")
                    latency = await _latency(service, config.latency_calls)
                    work = await _latency(
                        service, config.latency_calls // 2, WORK_TOOL, WORK_ARGUMENTS
                    )
                    progress(
                        f"service, {label}: {config.throughput_calls} calls, "
                        f"{config.in_flight} in flight ..."
                    )
                    throughput = await _throughput(
                        service, config.throughput_calls, config.in_flight
                    )
                finally:
                    await service.aclose()
                    engine.close()
                points[label] = {
                    "pool_size": pool_size,
                    "pooling_allocator_slots": engine.max_instances,
                    "latency": latency,
                    f"latency_{WORK_TOOL}": work,
                    "throughput": throughput,
                }
            return points

        service = asyncio.run(service_points())
        progress(f"baseline: a Python process per call, {config.baseline_calls} calls x 2 ...")
        baseline = _baseline(config.baseline_calls)
    finally:
        import shutil

        shutil.rmtree(cache, ignore_errors=True)
    return {
        "load_average_before": load_before,
        "build": build,
        "sandbox_only": bare,
        "service": service,
        "baseline": baseline,
    }


def build_document(measured: dict[str, Any], *, quick: bool, now: datetime) -> dict[str, Any]:
    ours = measured["service"]["prepared_instances"]
    base = measured["baseline"]
    latency_ratio = base["sequential"]["p50_ms"] / ours["latency"]["p50_ms"]
    rate_ratio = ours["throughput"]["calls_per_s"] / base["throughput"]["calls_per_s"]
    cpu_ms = ours["throughput"]["cpu_ms_per_call"]
    return {
        "suite": SUITE,
        "timestamp": now.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "quick": quick,
        "machine": machine_info(),
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "versions": package_versions(["agentd", "wasmtime", "componentize-py"]),
        "method": {
            "tool": f"built-in {TOOL}({json.dumps(ARGUMENTS)}); latency_{WORK_TOOL}: "
            f"{WORK_TOOL}({json.dumps(WORK_ARGUMENTS)})",
            "latency": "await ToolService.call, one in flight, 1 ms pause between calls; "
            "nearest-rank percentiles",
            "throughput": "ToolService.call with N in flight on max(4, 2 x cores) threads, "
            "the one tool allowed on all of them; CPU per call is this process's user + "
            "system time over the calls",
            "engine": "one SandboxEngine per point; pooled points size the pool as a node "
            "does (threads + prepared instances + 2)",
            "baseline": "subprocess.run([python, -I, script]) per call, JSON on stdin/stdout",
        },
        **measured,
        "ratios": {
            "latency_p50_vs_baseline": round(latency_ratio, 1),
            "calls_per_s_vs_baseline": round(rate_ratio, 1),
        },
        "targets": [
            {
                "name": "per_call_p50",
                "description": f"trivial tool p50 <= {TARGET_P50_MS:g} ms per call",
                "value": ours["latency"]["p50_ms"],
                "met": ours["latency"]["p50_ms"] <= TARGET_P50_MS,
            },
            {
                "name": "cpu_per_call",
                "description": f"CPU per trivial call <= {TARGET_CPU_MS:g} ms (16 in flight)",
                "value": cpu_ms,
                "met": cpu_ms <= TARGET_CPU_MS,
            },
            {
                "name": "vs_process_per_call",
                "description": f">= {TARGET_RATIO:g}x a process per call (p50 and calls/s)",
                "value": round(min(latency_ratio, rate_ratio), 1),
                "met": min(latency_ratio, rate_ratio) >= TARGET_RATIO,
            },
        ],
    }


def render(document: dict[str, Any], console: Console) -> None:
    table = Table(title=f"tools: {TOOL}({json.dumps(ARGUMENTS)}) per call")
    columns = ("runner", "p50 ms", "p99 ms", f"{WORK_TOOL} p50", "calls/s", "in flight", "CPU ms")
    for column in columns:
        table.add_column(column)
    for label, point in document["service"].items():
        table.add_row(
            f"agentd ToolService, {label.replace('_', ' ')}",
            f"{point['latency']['p50_ms']:.2f}",
            f"{point['latency']['p99_ms']:.2f}",
            f"{point[f'latency_{WORK_TOOL}']['p50_ms']:.2f}",
            f"{point['throughput']['calls_per_s']:,.0f}",
            str(point["throughput"]["in_flight"]),
            f"{point['throughput']['cpu_ms_per_call']:.2f}",
        )
    bare = document["sandbox_only"]
    table.add_row(
        "sandbox call alone, new instance", f"{bare['p50_ms']:.2f}", f"{bare['p99_ms']:.2f}"
    )
    base = document["baseline"]
    table.add_row(
        "python -I per call",
        f"{base['sequential']['p50_ms']:.2f}",
        f"{base['sequential']['p99_ms']:.2f}",
        "",
        f"{base['throughput']['calls_per_s']:,.0f}",
        str(base["throughput"]["in_flight"]),
        f"{base['throughput']['cpu_ms_per_call']:.2f}",
    )
    console.print(table)
    build = document["build"]
    console.print(
        f"cold build {build['cold_build_s']:.1f} s "
        f"({'measured now' if build['measured_now'] else 'recorded when built'}); "
        f"rebuild unchanged {build['rebuild_unchanged_s'] * 1000:.1f} ms; warm start "
        f"{build['warm_start']['load_ms_median']:.1f} ms load, "
        f"{build['warm_start']['load_and_first_call_ms_median']:.1f} ms with the first call"
    )
    for target in document["targets"]:
        verdict = "met" if target["met"] else "NOT met"
        console.print(f"{target['description']}: {target['value']} -> {verdict}")


def run_suite(
    quick: bool = False,
    json_out: bool = False,
    results_dir: Path | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    config = QUICK if quick else FULL
    return run_and_publish(
        SUITE,
        measure=lambda progress: collect(config, progress),
        build=lambda measured, now: build_document(measured, quick=quick, now=now),
        render=render,
        json_out=json_out,
        results_dir=results_dir,
        console=console,
    )
