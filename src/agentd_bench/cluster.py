"""``agentd bench cluster``: what spreading agentd over processes and nodes gives and costs,
in one run (issue 14's benchmark).

Sections, each with its targets (met or not), or the reason it could not run here:

* forwarding: the latency a forwarded ask adds (two nodes in one process; unix and TCP);
* gateway: unary gRPC Invoke at 64 in flight, ``agentd serve --processes 2`` vs 1 in
  alternating rounds; the stateless echo (target) and a stateful counter (reported);
* swarm: ``agentd swarm --processes 2`` vs 1: wall time, ratio, total peak RSS;
* rehome: three ``agentd serve --etcd`` nodes, kill -9 one, time until its partitions are
  owned by the survivors;
* store: the swarm on the Redis store vs SQLite (reported).

etcd and Redis are started from PATH on free loopback ports in a temporary folder.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from agentd_bench.cluster_gateway import GatewayConfig, measure_gateway
from agentd_bench.cluster_rehome import RehomeConfig, measure_rehome
from agentd_bench.cluster_servers import Skipped, redis_integer, redis_server, tree_rss_mb
from agentd_bench.errors import BenchError
from agentd_bench.results import (
    machine_info,
    package_versions,
    render_sections,
    run_and_publish,
)

__all__ = ["FULL", "QUICK", "ClusterConfig", "run_suite"]

SUITE = "cluster"
FORWARD_ADDED_P50_MS = 0.3
GATEWAY_RATIO = 1.05
SWARM_WALL_S = 6.5
SWARM_RATIO = 1.6
SWARM_RSS_MB = 1200.0
REHOME_SLACK_S = 1.0


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    forwarding_asks: int
    gateway: GatewayConfig
    swarm_agents: int
    rehome: RehomeConfig
    store_agents: int
    store_rounds: int


FULL = ClusterConfig(
    forwarding_asks=5000,
    gateway=GatewayConfig(rounds=3, duration_s=5.0, warmup_s=1.0),
    swarm_agents=1_000_000,
    rehome=RehomeConfig(trials=10, lease_ttl_s=5.0),
    store_agents=100_000,
    store_rounds=3,
)
# Quick: the suite's test of the bench itself (every section runs, nothing is concluded);
# sizes at which starting the processes is most of each section's time.
QUICK = ClusterConfig(
    forwarding_asks=500,
    gateway=GatewayConfig(rounds=1, duration_s=0.5, warmup_s=0.2),
    swarm_agents=20_000,
    rehome=RehomeConfig(trials=2, lease_ttl_s=2.0),
    store_agents=5_000,
    store_rounds=1,
)


# ---------------------------------------------------------------- sections


def _forwarding(config: ClusterConfig, workdir: Path, progress: Callable[[str], None]) -> Any:
    from agentd_bench.forwarding import measure_forwarding

    result = measure_forwarding(config.forwarding_asks)
    for scheme in ("unix", "tcp"):
        added = result[scheme]["added_p50_ms"]
        progress(f"forwarding over {scheme}: added p50 {added} ms")
    return result


def _json_run(command: list[str], timeout: float) -> tuple[dict[str, Any], float]:
    """Run ``command`` (it prints one JSON document); the document and the peak, sampled
    every 20 ms from /proc, of its process tree's summed RSS in MB."""
    child = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    peak = 0.0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.02):
            peak = max(peak, tree_rss_mb(child.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        raise BenchError(f"{' '.join(command[2:])} did not finish in {timeout:g} s") from None
    finally:
        stop.set()
        sampler.join()
    if child.returncode != 0:
        raise BenchError(f"{' '.join(command[2:])} failed: {stderr.decode()[-1500:]}")
    return json.loads(stdout), round(peak, 1)


def _swarm_help() -> str:
    command = [sys.executable, "-m", "agentd", "swarm", "--help"]
    return subprocess.run(command, capture_output=True, text=True, timeout=60).stdout


def _swarm(config: ClusterConfig, workdir: Path, progress: Callable[[str], None]) -> Any:
    if "--processes" not in _swarm_help():
        raise Skipped("agentd swarm has no --processes option here")
    agents = config.swarm_agents
    runs = {}
    for processes in (1, 2):
        progress(f"swarm of {agents:,} agents, --processes {processes} ...")
        command = [sys.executable, "-m", "agentd", "swarm", "--agents", str(agents)]
        command += ["--processes", str(processes), "--json"]
        run, tree_peak = _json_run(command, timeout=900)
        run["tree_peak_rss_mb_sampled"] = tree_peak
        runs[processes] = run
        progress(
            f"  {run['wall_s']:.2f} s, peak RSS {run['peak_rss_mb']} MB"
            f" (whole process tree, sampled: {tree_peak} MB)"
        )
    two = runs[2]
    return {
        "agents": agents,
        "processes_1": runs[1],
        "processes_2": two,
        "ratio": round(runs[1]["wall_s"] / two["wall_s"], 3),
        # The larger of the processes' own peaks summed and the sampled tree (which also
        # holds the supervising parent).
        "total_peak_rss_mb": max(two["peak_rss_mb"], two["tree_peak_rss_mb_sampled"]),
    }


def _rehome(config: ClusterConfig, workdir: Path, progress: Callable[[str], None]) -> Any:
    folder = workdir / "rehome"
    folder.mkdir()
    return measure_rehome(config.rehome, folder, progress)


def _gateway(config: ClusterConfig, workdir: Path, progress: Callable[[str], None]) -> Any:
    folder = workdir / "gateway"
    folder.mkdir()
    return measure_gateway(config.gateway, folder, progress)


def _store(config: ClusterConfig, workdir: Path, progress: Callable[[str], None]) -> Any:
    """The one-process swarm on SQLite and on Redis, in alternating rounds."""
    agents = config.store_agents
    folder = workdir / "redis"
    folder.mkdir()
    runs: dict[str, list[dict[str, Any]]] = {"sqlite": [], "redis": []}
    with redis_server(folder) as redis:
        for index in range(config.store_rounds):
            for store in ("sqlite", "redis") if index % 2 == 0 else ("redis", "sqlite"):
                command = [sys.executable, "-m", "agentd_bench.cluster_store"]
                command += ["--agents", str(agents), "--store", store, "--redis-url", redis.url]
                progress(f"swarm of {agents:,} agents on {store} ...")
                if store == "redis":
                    redis_integer(redis.url, "FLUSHDB")  # each run starts empty, as SQLite's
                run, _ = _json_run(command, timeout=900)
                if not run["ok"]:
                    raise BenchError(f"the swarm on {store} did not hear from every agent")
                if store == "redis":  # the states are there: one hash per agent
                    run["states_in_store"] = redis_integer(redis.url, "DBSIZE")
                runs[store].append(run)
                progress(f"  {run['decisions_per_s']:,.0f} decisions/s")
    result: dict[str, Any] = {
        "agents": agents,
        "redis_appendfsync": "everysec",
        "how": "agentd.swarm.run_swarm in one process, its node's state_store changed",
    }
    for store, done in runs.items():
        rates = [r["decisions_per_s"] for r in done]
        result[store] = {
            "decisions_per_s": round(statistics.median(rates), 1),
            "runs_decisions_per_s": rates,
            "wall_s": round(statistics.median(r["wall_s"] for r in done), 3),
            "store_writes": done[-1]["store_writes"],
            "states_in_store": done[-1].get("states_in_store"),
        }
    return result


SECTIONS: dict[str, Callable[[ClusterConfig, Path, Callable[[str], None]], Any]] = {
    "forwarding": _forwarding,
    "gateway": _gateway,
    "swarm": _swarm,
    "rehome": _rehome,
    "store": _store,
}


def collect(
    config: ClusterConfig, progress: Callable[[str], None], sections: list[str] | None = None
) -> dict[str, Any]:
    """Every section's figures, or ``{"skipped": why}`` / ``{"failed": what}``."""
    measured: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="agentd-bench-cluster-") as scratch:
        for name, section in SECTIONS.items():
            if sections is not None and name not in sections:
                measured[name] = {"skipped": "not asked for in this run"}
                continue
            progress(f"== {name}")
            load_before = os.getloadavg()[0]
            try:
                measured[name] = section(config, Path(scratch), progress)
                # Other work on the machine shows here (a shared machine's figures vary).
                measured[name]["load_average_1m"] = [
                    round(load_before, 2),
                    round(os.getloadavg()[0], 2),
                ]
            except Skipped as exc:
                measured[name] = {"skipped": str(exc)}
                progress(f"{name}: skipped: {exc}")
            except BenchError as exc:
                # One section failing does not lose the others; the reason is kept.
                measured[name] = {"failed": str(exc)}
                progress(f"{name}: failed: {exc}")
    return measured


# ---------------------------------------------------------------- document


def _target(name: str, description: str, value: Any, met: bool) -> dict[str, Any]:
    return {"name": name, "description": description, "value": value, "met": bool(met)}


def _targets(name: str, section: dict[str, Any], config: ClusterConfig) -> list[dict[str, Any]]:
    if "skipped" in section or "failed" in section:
        return []
    if name == "forwarding":
        return [
            _target(
                f"forwarded_added_p50_{scheme}",
                f"a forwarded ask adds <= {FORWARD_ADDED_P50_MS} ms at p50 ({scheme})",
                section[scheme]["added_p50_ms"],
                section[scheme]["added_p50_ms"] <= FORWARD_ADDED_P50_MS,
            )
            for scheme in ("unix", "tcp")
        ]
    if name == "gateway":
        echo = section["echo"]
        one, two = echo["processes_1"], echo["processes_2"]
        no_errors = one["errors"] == 0 and two["errors"] == 0
        return [
            _target(
                "gateway_processes_2_vs_1",
                f"echo Invoke at 64 in flight: --processes 2 >= {GATEWAY_RATIO}x req/s of 1",
                echo["ratio_rps"],
                no_errors and echo["ratio_rps"] is not None and echo["ratio_rps"] >= GATEWAY_RATIO,
            ),
            _target(
                "gateway_p99_no_worse",
                "p99 with --processes 2 no worse than with 1 (ms, 2 vs 1)",
                [two["p99_ms"], one["p99_ms"]],
                two["p99_ms"] is not None
                and one["p99_ms"] is not None
                and two["p99_ms"] <= one["p99_ms"],
            ),
        ]
    if name == "swarm":
        full = section["agents"] >= 1_000_000
        ok = section["processes_2"].get("ok", False)
        wall = section["processes_2"]["wall_s"]
        return [
            _target(
                "swarm_million_wall",
                f"1M agents with --processes 2 in <= {SWARM_WALL_S} s",
                wall,
                full and ok and wall <= SWARM_WALL_S,
            ),
            _target(
                "swarm_ratio",
                f"--processes 2 >= {SWARM_RATIO}x as fast as 1",
                section["ratio"],
                ok and section["ratio"] >= SWARM_RATIO,
            ),
            _target(
                "swarm_total_rss",
                f"total peak RSS with --processes 2 <= {SWARM_RSS_MB:g} MB",
                section["total_peak_rss_mb"],
                full and section["total_peak_rss_mb"] <= SWARM_RSS_MB,
            ),
        ]
    if name == "rehome":
        bound = section["lease_ttl_s"] + REHOME_SLACK_S
        return [
            _target(
                "rehome_p99",
                f"partitions of a node killed with -9 owned by survivors in <= TTL + 1 s"
                f" ({bound:g} s) at p99 over 10 trials",
                section["p99_s"],
                section["p99_s"] <= bound and len(section["trials"]) >= 10,
            )
        ]
    return []  # store: reported, no target


def build_document(
    measured: dict[str, Any], config: ClusterConfig, *, quick: bool, now: datetime
) -> dict[str, Any]:
    sections = {}
    for name, section in measured.items():
        sections[name] = {**section, "targets": _targets(name, section, config)}
    return {
        "suite": SUITE,
        "timestamp": now.isoformat(),
        "quick": quick,
        "machine": machine_info(),
        "versions": package_versions(["agentd", "uvloop", "redis", "aetcd"]),
        "sections": sections,
        "targets": [t for s in sections.values() for t in s["targets"]],
    }


def render(document: dict[str, Any], console: Console) -> None:
    render_sections("cluster", document, console, _figures)


def _figures(name: str, s: dict[str, Any]) -> str:
    if name == "forwarding":
        return "\n".join(
            f"{scheme}: local p50 {s[scheme]['local']['p50_ms']} ms, forwarded p50"
            f" {s[scheme]['forwarded']['p50_ms']} ms (p99 {s[scheme]['forwarded']['p99_ms']})"
            for scheme in ("unix", "tcp")
        )
    if name == "gateway":
        lines = []
        for call in ("echo", "counter"):
            for n in (1, 2):
                p = s[call][f"processes_{n}"]
                lines.append(
                    f"{call} --processes {n}: {p['rps']:,.0f} req/s, p99 {p['p99_ms']} ms,"
                    f" {p['cpu_us_per_request']} µs CPU/req, errors {p['errors']}"
                )
            lines.append(f"{call} ratio 2/1: {s[call]['ratio_rps']}")
        return "\n".join(lines)
    if name == "swarm":
        one, two = s["processes_1"], s["processes_2"]
        return (
            f"{s['agents']:,} agents: 1 process {one['wall_s']} s, 2 processes"
            f" {two['wall_s']} s (ratio {s['ratio']}), total peak RSS {s['total_peak_rss_mb']} MB"
        )
    if name == "rehome":
        return (
            f"{s['nodes']} nodes, {s['partitions']} partitions, lease TTL {s['lease_ttl_s']} s:"
            f" p50 {s['p50_s']} s, p99 {s['p99_s']} s over {len(s['trials'])} trials"
        )
    if name == "store":
        return "\n".join(
            f"{store}: {s[store]['decisions_per_s']:,.0f} decisions/s, {s[store]['wall_s']} s"
            for store in ("sqlite", "redis")
        )
    return json.dumps(s)[:500]


def run_suite(
    quick: bool = False,
    json_out: bool = False,
    results_dir: Path | None = None,
    console: Console | None = None,
    sections: list[str] | None = None,
) -> dict[str, Any]:
    """Run the sections, write the JSON files, print a table (or the JSON)."""
    config = QUICK if quick else FULL
    return run_and_publish(
        SUITE,
        measure=lambda progress: collect(config, progress, sections),
        build=lambda measured, now: build_document(measured, config, quick=quick, now=now),
        render=render,
        json_out=json_out,
        results_dir=results_dir,
        console=console,
    )
