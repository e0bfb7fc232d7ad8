"""``agentd bench swarm``: the actor runtime's swarm against two baselines, in one run.

* agentd: ``agentd swarm`` (virtual actors, worker pool, batched ``ctx.infer``, SQLite
  state) with N agents;
* thread-per-agent: 10k OS threads with ``queue.Queue`` mailboxes, unbatched inference
  (records where thread creation fails);
* asyncio task-per-agent: N tasks with ``asyncio.Queue`` mailboxes, unbatched inference;
* two halves at once (no target): two ``agentd swarm`` processes of N/2 agents each, each
  with its own collector and store, started together. Nothing crosses between them, so
  this is the most that splitting the swarm over this machine's two cores could give.

Each runs in its own process so peak RSS is its own. Targets: 1M agents in <= 15 s with
peak RSS <= 1.5 GB (persistence on); batched decisions/s >= 10x the task-per-agent baseline.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from agentd_bench.errors import BenchError
from agentd_bench.results import machine_info, package_versions, utc_stamp, write_results

__all__ = ["QUICK_AGENTS", "QUICK_THREADS", "BenchError", "run_suite"]

SUITE = "swarm"
TARGET_WALL_S = 15.0
TARGET_RSS_MB = 1536.0
TARGET_RATIO = 10.0
# --quick tests the bench itself (every run happens, nothing is concluded): sizes at which
# process start-up, not the agents, is most of the time.
QUICK_AGENTS = 20_000
QUICK_THREADS = 500


def _run_json(args: list[str], timeout: float) -> dict[str, Any]:
    (result,) = _run_json_together([args], timeout)
    return result


def _run_json_together(commands: list[list[str]], timeout: float) -> list[dict[str, Any]]:
    """Run ``python -m ARGS`` for each command at once; their JSON outputs, in order."""
    children = [
        subprocess.Popen(
            [sys.executable, "-m", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in commands
    ]
    outputs = []
    try:
        for args, child in zip(commands, children, strict=True):
            stdout, stderr = child.communicate(timeout=timeout)
            if child.returncode != 0:
                raise BenchError(f"{' '.join(args)} failed:\n{stderr[-2000:]}")
            outputs.append(json.loads(stdout))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    return outputs


def _two_halves(agents: int) -> dict[str, Any]:
    """Two swarms of half the agents each, at once; their span from the first start
    message to the last report."""
    half = agents // 2
    command = ["agentd", "swarm", "--agents", str(half), "--json"]
    runs = _run_json_together([command, command], timeout=900)
    span = max(r["finished_at"] for r in runs) - min(r["started_at"] for r in runs)
    return {
        "agents": 2 * half,
        "ok": all(r["ok"] for r in runs),
        "wall_s": round(span, 3),
        "decisions_per_s": round(2 * half / span, 1),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "halves_wall_s": [r["wall_s"] for r in runs],
    }


def run_suite(
    quick: bool = False, json_out: bool = False, results_dir: Path | None = None
) -> dict[str, Any]:
    agents = QUICK_AGENTS if quick else 1_000_000
    threads = QUICK_THREADS if quick else 10_000
    status = Console(stderr=True)
    status.print(f"agentd swarm, {agents:,} agents ...")
    ours = _run_json(["agentd", "swarm", "--agents", str(agents), "--json"], timeout=900)
    status.print(f"thread-per-agent baseline, {threads:,} agents ...")
    per_thread = _run_json(
        ["agentd_bench.baselines.swarm_threads", "--agents", str(threads)], timeout=900
    )
    status.print(f"asyncio task-per-agent baseline, {agents:,} agents ...")
    per_task = _run_json(
        ["agentd_bench.baselines.swarm_tasks", "--agents", str(agents)], timeout=900
    )
    status.print(f"two halves at once, {agents // 2:,} agents each ...")
    halves = _two_halves(agents)
    ratio = ours["decisions_per_s"] / per_task["decisions_per_s"]
    document = {
        "suite": SUITE,
        "timestamp": utc_stamp(),
        "quick": quick,
        "machine": machine_info(),
        "versions": package_versions(["agentd", "onnxruntime", "numpy"]),
        "agentd": ours,
        "thread_per_agent": per_thread,
        "task_per_agent": per_task,
        "ratio_vs_task_per_agent": round(ratio, 2),
        "two_halves": halves,
        "two_halves_ratio_vs_task_per_agent": round(
            halves["decisions_per_s"] / per_task["decisions_per_s"], 2
        ),
        "targets": [
            {
                "name": "million_agents_wall",
                "description": f"{agents:,} agents complete in <= {TARGET_WALL_S:g} s",
                "value": ours["wall_s"],
                "met": ours["ok"] and ours["wall_s"] <= TARGET_WALL_S and agents >= 1_000_000,
            },
            {
                "name": "million_agents_rss",
                "description": f"peak RSS <= {TARGET_RSS_MB:g} MB with persistence on",
                "value": ours["peak_rss_mb"],
                "met": ours["peak_rss_mb"] <= TARGET_RSS_MB and ours["persistence"],
            },
            {
                "name": "batched_vs_unbatched",
                "description": f"decisions/s >= {TARGET_RATIO:g}x asyncio task-per-agent",
                "value": round(ratio, 2),
                "met": ratio >= TARGET_RATIO,
            },
        ],
    }
    path = write_results(SUITE, document, results_dir)
    if json_out:
        print(json.dumps(document, indent=2))
    else:
        _table(document)
        Console().print(f"results: {path}")
    return document


def _table(document: dict[str, Any]) -> None:
    table = Table(title="swarm: decisions with the built-in model")
    for column in ("runtime", "agents", "wall s", "decisions/s", "peak RSS MB", "notes"):
        table.add_column(column)
    ours, threads, tasks = (
        document["agentd"],
        document["thread_per_agent"],
        document["task_per_agent"],
    )
    table.add_row(
        "agentd (actors, batched, SQLite)",
        f"{ours['agents']:,}",
        f"{ours['wall_s']:.2f}",
        f"{ours['decisions_per_s']:,.0f}",
        f"{ours['peak_rss_mb']:,.0f}",
        f"p99 turn {ours['turn_p99_ms']:.0f} ms, batch {ours['mean_batch']:,.0f}",
    )
    note = "all started" if threads["failed_at"] is None else f"failed at {threads['failed_at']}"
    table.add_row(
        "thread per agent, unbatched",
        f"{threads['agents_started']:,}",
        f"{threads['wall_s']:.2f}",
        f"{threads['decisions_per_s']:,.0f}",
        f"{threads['peak_rss_mb']:,.0f}",
        note,
    )
    table.add_row(
        "asyncio task per agent, unbatched",
        f"{tasks['agents']:,}",
        f"{tasks['wall_s']:.2f}",
        f"{tasks['decisions_per_s']:,.0f}",
        f"{tasks['peak_rss_mb']:,.0f}",
        "",
    )
    halves = document["two_halves"]
    table.add_row(
        "agentd, two processes of half (ceiling)",
        f"{halves['agents']:,}",
        f"{halves['wall_s']:.2f}",
        f"{halves['decisions_per_s']:,.0f}",
        f"{halves['peak_rss_mb']:,.0f} each",
        f"{document['two_halves_ratio_vs_task_per_agent']}x task per agent; no target",
    )
    Console().print(table)
    for target in document["targets"]:
        mark = "met" if target["met"] else "NOT met"
        Console().print(f"  {target['description']}: {target['value']} — {mark}")
