"""`agentd bench cluster --quick` runs every section end to end (etcd, Redis and h2load from
PATH) and writes complete JSON; a section whose binary is missing says why instead.

Timings are the benchmark's business: what is asserted is that each section measured what
it says (calls answered without errors, forwarded calls where there are two processes,
partitions re-homed to the survivors, states written to both stores)."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime

import pytest
from rich.console import Console

from agentd_bench import cluster

pytestmark = pytest.mark.bench  # a suite end to end: `pytest -m bench`

INSTALL_H2LOAD = "install it with: apt-get install nghttp2-client"
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_bench_cluster_quick(tmp_path):
    command = ["agentd", "bench", "cluster", "--quick", "--json", "--out-dir", str(tmp_path)]
    out = subprocess.run(
        [sys.executable, "-m", *command], capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-3000:]
    document = json.loads(out.stdout)
    assert json.loads((tmp_path / "cluster-latest.json").read_text()) == document
    assert document["suite"] == "cluster" and document["quick"]
    sections = document["sections"]
    for name, section in sections.items():
        assert "skipped" not in section and "failed" not in section, (name, section)

    forwarding = sections["forwarding"]
    for scheme in ("unix", "tcp"):
        assert forwarding[scheme]["forwarded"]["p50_ms"] > 0

    gateway = sections["gateway"]
    for call in ("echo", "counter"):
        for processes in (1, 2):
            figures = gateway[call][f"processes_{processes}"]
            assert figures["errors"] == 0, (call, processes, figures)
            for measured in figures["rounds"]:
                assert measured["requests"] > 0 and measured["cpu_us_per_request"] > 0
    for measured in gateway["counter"]["processes_1"]["rounds"]:
        # One process owns every agent: nothing is forwarded.
        assert measured["forwarded_total"] == 0
        assert measured["calls_total"] >= measured["requests"]
    for measured in gateway["counter"]["processes_2"]["rounds"]:
        # Counters owned by each process, connections on both: some calls cross.
        assert 0 < measured["forwarded_total"] < measured["calls_total"]
        assert measured["calls_total"] >= measured["requests"]

    swarm = sections["swarm"]
    assert swarm["agents"] == cluster.QUICK.swarm_agents
    assert swarm["processes_1"]["ok"] and swarm["processes_2"]["ok"]
    assert swarm["processes_2"]["processes"] == 2
    assert swarm["total_peak_rss_mb"] >= swarm["processes_2"]["peak_rss_mb"]

    rehome = sections["rehome"]
    # Two trials: the second kills another node, after the first one's came back and the
    # three owned the partitions as planned again.
    assert len(rehome["trials"]) == cluster.QUICK.rehome.trials == 2
    assert {t["node"] for t in rehome["trials"]} == {"n0", "n1"}
    for trial in rehome["trials"]:
        assert 300 <= trial["partitions"] <= 400  # a third of 1,024
        # Not before the dead node's lease can have expired.
        assert trial["rehome_s"] > 0.5 * rehome["lease_ttl_s"]

    store = sections["store"]
    assert store["agents"] == cluster.QUICK.store_agents
    for name in ("sqlite", "redis"):
        assert store[name]["decisions_per_s"] > 0
    assert store["sqlite"]["store_writes"] == store["agents"]
    # Read back from Redis itself: one hash per agent, the run started on an empty database.
    assert store["redis"]["states_in_store"] == store["agents"]

    names = {t["name"] for t in document["targets"]}
    assert names == {
        "forwarded_added_p50_unix",
        "forwarded_added_p50_tcp",
        "gateway_processes_2_vs_1",
        "gateway_p99_no_worse",
        "swarm_million_wall",
        "swarm_ratio",
        "swarm_total_rss",
        "rehome_p99",
    }
    by_name = {t["name"]: t for t in document["targets"]}
    # --quick cannot claim what needs the full run: a million agents, ten trials.
    assert not by_name["swarm_million_wall"]["met"]
    assert not by_name["rehome_p99"]["met"]


def test_a_section_whose_binary_is_missing_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no etcd, redis-server or h2load
    lines: list[str] = []
    measured = cluster.collect(cluster.QUICK, lines.append, ["gateway", "rehome", "store"])
    assert measured["gateway"] == {"skipped": "h2load not found on PATH; " + INSTALL_H2LOAD}
    assert measured["rehome"] == {"skipped": "etcd not found on PATH (apt-get install etcd-server)"}
    assert measured["store"] == {
        "skipped": "redis-server not found on PATH (apt-get install redis-server)"
    }
    for name in ("forwarding", "swarm"):
        assert measured[name] == {"skipped": "not asked for in this run"}
    document = cluster.build_document(measured, cluster.QUICK, quick=True, now=NOW)
    assert document["targets"] == []
    console = Console(record=True, width=200)
    cluster.render(document, console)
    text = console.export_text()
    assert "not run: etcd not found on PATH" in text
    assert "Traceback" not in text and "Traceback" not in "\n".join(lines)
