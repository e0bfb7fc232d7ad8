"""`agentd swarm` with 100k agents: every agent decides and reports exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_swarm_100k_agents(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "agentd",
            "swarm",
            "--agents",
            "100000",
            "--json",
            "--state-path",
            str(tmp_path / "swarm.db"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["ok"] is True
    assert result["distinct_results"] == 100_000 and result["duplicates"] == 0
    assert result["store_writes"] >= 100_000  # every decider's state, plus the collector
    assert sum(result["actions"].values()) == 100_000
    assert result["mean_batch"] > 100  # decisions were batched across agents
    # The states are on disk: every decider's chosen action.
    import sqlite3

    with sqlite3.connect(tmp_path / "swarm.db") as db:
        (rows,) = db.execute(
            "SELECT count(*) FROM agent_state WHERE address LIKE 'decider/%'"
        ).fetchone()
    assert rows == 100_000


def test_swarm_rejects_bad_count():
    out = subprocess.run(
        [sys.executable, "-m", "agentd", "swarm", "--agents", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "at least 1" in out.stderr


def test_swarm_takes_no_settings_from_the_environment(tmp_path):
    # The swarm runs on a node built from its flags only: agentd serve's variables and
    # config file (here an unreadable one, a default deadline too short for any turn and
    # a plugins folder with no decision model) do not reach it.
    env = {
        **os.environ,
        "AGENTD_CONFIG": str(tmp_path / "missing.yaml"),
        "AGENTD_DEFAULT_TIMEOUT_S": "0.000001",
        "AGENTD_PLUGINS": str(tmp_path / "plugins"),
        "AGENTD_WORKERS": "0",
    }
    out = subprocess.run(
        [sys.executable, "-m", "agentd", "swarm", "--agents", "2000", "--json", "--no-persist"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["ok"] is True and result["distinct_results"] == 2000
