"""/metrics of a live node: process metrics, names promtool accepts, exemplars and
OpenMetrics, and the dashboard and alert rules in docs/ naming only what it exports."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from agentd.observability.cluster_metrics import ClusterMetrics
from agentd.testing import RunningServer, start_server
from tests.conftest import PLUGINS, metric_value

INVOKE = "/agentd.v1.AgentService/Invoke"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"


@pytest.fixture(scope="module")
def node() -> Iterator[RunningServer]:
    running = start_server(["--plugins", str(PLUGINS)])
    yield running
    running.stop()


@pytest.fixture(scope="module")
def scraped(node: RunningServer) -> str:
    """The node's /metrics after a little traffic (and a loop-lag sample)."""
    with httpx.Client(base_url=node.url, timeout=30) as client:
        for i in range(5):
            client.post(INVOKE, json={"agent": f"echo/m{i}", "message": {"text": "hi"}})
        client.post(INVOKE, json={"agent": "ghost"})  # an error status
        deadline = time.monotonic() + 10
        while True:
            text = client.get("/metrics").text
            if metric_value(text, "agentd_event_loop_lag_seconds_count") >= 1:
                return text
            assert time.monotonic() < deadline, "no loop lag sample in 10 s"
            time.sleep(0.2)


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", *args], input=stdin, capture_output=True, text=True, timeout=60
    )


def test_gc_pauses_and_loop_lag_exported(scraped: str) -> None:
    # The node runs a full collection once started (before gc.freeze).
    assert metric_value(scraped, "agentd_gc_pause_seconds_count", generation="2") >= 1
    assert metric_value(scraped, "agentd_gc_pause_seconds_sum", generation="2") > 0
    assert "# TYPE agentd_gc_pause_seconds histogram" in scraped
    assert "# TYPE agentd_event_loop_lag_seconds histogram" in scraped
    assert metric_value(scraped, "agentd_event_loop_lag_seconds_count") >= 1


def test_promtool_check_metrics_clean(scraped: str) -> None:
    result = promtool("check", "metrics", stdin=scraped)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""


def test_promtool_check_cluster_metrics_clean() -> None:
    # A cluster node needs etcd: its metrics are checked from their registry.
    registry = CollectorRegistry()
    cluster = ClusterMetrics(registry)
    cluster.forwarded("ask", "ok", 0.01)
    cluster.forwarded_tells(3)
    cluster.partitions_moved("in", 2)
    cluster.partitions_owned(2)
    cluster.fenced_write()
    cluster.lease_renewal("ok")
    cluster.lease_renewal("error")
    cluster.scaling_decision(3, "load")
    cluster.node("n1")
    result = promtool("check", "metrics", stdin=generate_latest(registry).decode())
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""


def test_promtool_flags_a_bad_name() -> None:
    # The check above is only worth something if promtool lints what it is given.
    bad = "# HELP agentd_things Things.\n# TYPE agentd_things counter\nagentd_things 1\n"
    result = promtool("check", "metrics", stdin=bad)
    assert 'counter metrics should have "_total" suffix' in result.stdout + result.stderr


DOCS = Path(__file__).parents[2] / "docs"
