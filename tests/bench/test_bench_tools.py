"""`agentd bench tools --quick` runs end to end and writes complete JSON (timings are the
benchmark's business, not asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from agentd_bench.tools import QUICK

pytestmark = pytest.mark.bench  # a suite end to end: `pytest -m bench`


def test_bench_tools_quick(tmp_path):
    command = ["agentd", "bench", "tools", "--quick", "--json", "--out-dir", str(tmp_path)]
    out = subprocess.run(
        [sys.executable, "-m", *command],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    document = json.loads(out.stdout)
    assert (tmp_path / "tools-latest.json").is_file()
    for label in ("prepared_instances", "fresh_instance_in_call", "prepared_instances_no_pool"):
        point = document["service"][label]
        assert point["latency"]["calls"] == QUICK.latency_calls
        assert point["throughput"]["calls"] == QUICK.throughput_calls
        assert point["latency"]["p50_ms"] > 0
        assert point["throughput"]["calls_per_s"] > 0
    assert document["baseline"]["sequential"]["p50_ms"] > 0
    assert document["build"]["rebuild_unchanged_s"] < 1
    assert {t["name"] for t in document["targets"]} == {
        "per_call_p50",
        "cpu_per_call",
        "vs_process_per_call",
    }
