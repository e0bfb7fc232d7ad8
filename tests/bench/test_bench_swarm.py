"""`agentd bench swarm --quick` runs the swarm, both baselines and the two halves end to end
and writes complete JSON (timings are the benchmark's business, not asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from agentd_bench.swarm import QUICK_AGENTS, QUICK_THREADS

pytestmark = pytest.mark.bench  # a suite end to end: `pytest -m bench`


def test_bench_swarm_quick(tmp_path):
    command = ["agentd", "bench", "swarm", "--quick", "--json", "--out-dir", str(tmp_path)]
    out = subprocess.run(
        [sys.executable, "-m", *command], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    document = json.loads(out.stdout)
    assert (tmp_path / "swarm-latest.json").is_file()
    ours, tasks = document["agentd"], document["task_per_agent"]
    assert ours["ok"] and ours["persistence"] and ours["agents"] == QUICK_AGENTS
    assert tasks["distinct_results"] == tasks["agents"] == QUICK_AGENTS
    threads = document["thread_per_agent"]
    assert threads["distinct_results"] == threads["agents_started"] > 0
    assert threads["agents_started"] <= QUICK_THREADS
    halves = document["two_halves"]
    assert halves["ok"] and halves["agents"] == QUICK_AGENTS
    # The span covers both halves, each of which ran for part of it.
    assert halves["wall_s"] >= max(halves["halves_wall_s"]) * 0.99
    ratio = ours["decisions_per_s"] / tasks["decisions_per_s"]
    assert document["ratio_vs_task_per_agent"] == round(ratio, 2)
    assert {t["name"] for t in document["targets"]} == {
        "million_agents_wall",
        "million_agents_rss",
        "batched_vs_unbatched",
    }
    # --quick runs 20k agents: the million-agent wall target cannot be claimed from it.
    assert not next(t for t in document["targets"] if t["name"] == "million_agents_wall")["met"]
