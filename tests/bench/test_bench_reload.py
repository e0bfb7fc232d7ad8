"""`agentd bench reload --quick` runs end to end on two real `agentd serve` processes and
writes complete JSON: every reload was answered by its new version and counted by the
server, the figures are ordered and plausible, the memory readings are of a live process.

Timings are the benchmark's business (asserted only to be positive and ordered); what is
asserted is that each section measured what it says."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from agentd_bench import reload

pytestmark = pytest.mark.bench  # a suite end to end: `pytest -m bench`

QUICK_RELOADS = reload.QUICK.agent_reloads
QUICK_EARLY = reload.QUICK.memory_early
QUICK_CYCLES = reload.QUICK.memory_cycles
QUICK_MODEL_RELOADS = reload.QUICK.model_reloads


def test_bench_reload_quick(tmp_path):
    command = ["agentd", "bench", "reload", "--quick", "--json", "--out-dir", str(tmp_path)]
    out = subprocess.run(
        [sys.executable, "-m", *command], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    document = json.loads(out.stdout)
    assert json.loads((tmp_path / "reload-latest.json").read_text()) == document
    stamped = [p for p in tmp_path.glob("reload-*.json") if p.name != "reload-latest.json"]
    assert len(stamped) == 1
    assert document["suite"] == "reload" and document["quick"]
    assert document["machine"]["cpu_count"] >= 1
    sections = document["sections"]

    for name in ("agent", "agent_signed"):
        section = sections[name]
        assert "skipped" not in section and "failed" not in section, (name, section)
        assert section["reloads"] == QUICK_RELOADS
        assert len(section["latencies_ms"]) == QUICK_RELOADS
        # Not faster than the quiet period the watcher waits after a write.
        assert section["reload_debounce_ms"] <= section["p50_ms"]
        assert section["p50_ms"] <= section["p99_ms"] <= section["max_ms"] < 10_000
        assert section["max_ms"] == max(section["latencies_ms"])
        assert section["calls"] >= QUICK_RELOADS  # at least the answer of each new version
        # The server counted each write as one reload that loaded.
        assert section["reloads_ok"] == QUICK_RELOADS
        assert 0 < section["server_reload_mean_ms"] < section["p50_ms"]
    assert sections["agent"]["reloads_not_ok"] == 0
    assert sections["agent"]["require_signature"] is False
    assert sections["agent_signed"]["require_signature"] is True
    assert sections["agent_signed"]["sign_p50_ms"] > 0

    memory = sections["memory"]
    assert "skipped" not in memory and "failed" not in memory, memory
    assert (memory["early_cycle"], memory["cycles"]) == (QUICK_EARLY, QUICK_CYCLES)
    # The same server: the agent section's reloads are the first cycles.
    assert memory["reloads_ok"] == QUICK_CYCLES and memory["reloads_not_ok"] == 0
    for key in ("rss_mb_early", "rss_mb_late", "supervisor_rss_mb_early"):
        assert 10 < memory[key] < 8192, (key, memory)
    # The tree holds the supervising `agentd serve` and the Envoy child that runs the node.
    assert memory["rss_mb_early"] > memory["supervisor_rss_mb_early"]
    early, late = memory["rss_mb_early"], memory["rss_mb_late"]
    assert abs(early * memory["growth_pct"] / 100 - (late - early)) < 0.2  # MB, rounding
    assert [s[0] for s in memory["samples"]] == [QUICK_EARLY, QUICK_CYCLES]

    model = sections["model"]
    assert "skipped" not in model and "failed" not in model, model
    assert model["reloads"] == QUICK_MODEL_RELOADS == model["reloads_ok"]
    assert model["reload_debounce_ms"] <= model["p50_ms"] <= model["max_ms"] < 10_000
    # Each reload's new version was seen answering; the callers called throughout.
    assert model["calls"] > model["reloads"] and model["seconds"] > 0
    assert model["failed_calls"] == 0 and model["failures"] == [], model["failures"]
    assert model["server_reload_mean_ms"] > 0

    tool = sections["tool"]  # measured, or why not
    assert "failed" not in tool, tool

    targets = {t["name"]: t for t in document["targets"]}
    assert set(targets) >= {"agent_p99", "agent_signed_p99", "memory_flat", "model_no_failed_calls"}
    assert targets["agent_p99"]["value"] == sections["agent"]["p99_ms"]
    assert all(isinstance(t["met"], bool) for t in targets.values())
