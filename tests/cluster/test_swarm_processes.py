"""``agentd swarm --processes 2``: the swarm over two node processes, run as a user would."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys


def swarm(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentd", "swarm", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "120"},
    )


def test_twenty_thousand_agents_over_two_processes(tmp_path):
    state = tmp_path / "swarm.db"
    out = swarm("--agents", "20000", "--processes", "2", "--json", "--state-path", str(state))
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)
    assert result["ok"] is True
    assert result["distinct_results"] == 20000 and result["duplicates"] == 0
    assert sum(result["actions"].values()) == 20000
    assert result["processes"] == 2 and len(result["process_peak_rss_mb"]) == 2
    assert result["peak_rss_mb"] == round(sum(result["process_peak_rss_mb"]), 1)
    # The wall time runs from the first start (any process) to the last report.
    assert abs(result["finished_at"] - result["started_at"] - result["wall_s"]) < 0.01
    # One collector shard per process; each process's own shards finished within the
    # wall time, the last one at its end; each process reports the CPU it used.
    assert result["collector_shards"] == 2
    assert max(result["process_finished_s"]) == result["wall_s"]
    assert all(0 < t <= result["wall_s"] for t in result["process_finished_s"])
    assert len(result["process_cpu_s"]) == 2 and all(c > 0 for c in result["process_cpu_s"])
    # Both processes wrote their deciders' states to the one SQLite file.
    assert result["store_writes"] >= 20000
    with sqlite3.connect(state) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        rows = sum(db.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables)
    assert rows >= 20000


def test_the_table_names_every_process(tmp_path):
    out = swarm("--agents", "2000", "--processes", "2", "--no-persist")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "result" in out.stdout and "ok" in out.stdout
    assert "in 2 processes" in out.stdout
    assert "collector shards" in out.stdout and "per process" in out.stdout


def test_bad_process_counts_are_refused_in_one_line():
    for count in ("0", "65"):
        out = swarm("--agents", "10", "--processes", count)
        assert out.returncode == 2
        assert out.stderr.strip() == f"error: --processes must be between 1 and 64, not {count}"
