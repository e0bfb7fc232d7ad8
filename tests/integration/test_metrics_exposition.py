"""/metrics of a live node: process metrics, names promtool accepts, exemplars and
OpenMetrics, and the dashboard and alert rules in docs/ naming only what it exports."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
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


OPENMETRICS = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"


def exemplar_lines(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name) and " # {" in line]


def test_openmetrics_with_request_exemplars_when_asked(node: RunningServer) -> None:
    with httpx.Client(base_url=node.url, timeout=30) as client:
        r = client.post(
            INVOKE,
            json={"agent": "echo/traced", "message": {"text": "hi"}},
            headers={"traceparent": TRACEPARENT},
        )
        assert r.status_code == 200
        r = client.get("/metrics", headers={"accept": OPENMETRICS})
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/openmetrics-text")
        assert r.text.endswith("# EOF\n")
        lines = exemplar_lines(r.text, "agentd_request_duration_seconds_bucket")
        assert any(f'trace_id="{TRACE_ID}"' in line and INVOKE in line for line in lines), lines
        # Prometheus text (no Accept, or one that does not ask for OpenMetrics) has none.
        for accept in (None, "text/plain", "application/openmetrics-text;q=0", "*/*;q=x,;;"):
            headers = {"accept": accept} if accept is not None else {}
            r = client.get("/metrics", headers=headers)
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/plain")
            assert " # {" not in r.text and "# EOF" not in r.text


class _Collector:
    """An OTLP/HTTP endpoint that accepts every export (the spans are not looked at)."""

    def __enter__(self) -> str:
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def test_traced_node_puts_trace_ids_on_request_latency() -> None:
    with _Collector() as endpoint:
        running = start_server(["--plugins", str(PLUGINS)], env={"AGENTD_OTLP_ENDPOINT": endpoint})
        try:
            with httpx.Client(base_url=running.url, timeout=30) as client:
                r = client.post(
                    INVOKE,
                    json={"agent": "echo/traced", "message": {"text": "hi"}},
                    headers={"traceparent": TRACEPARENT},
                )
                assert r.status_code == 200
                text = client.get("/metrics", headers={"accept": OPENMETRICS}).text
        finally:
            running.stop()
    # The server span continues the caller's trace: its id is the exemplar's.
    requests = exemplar_lines(text, "agentd_request_duration_seconds_bucket")
    assert any(f'trace_id="{TRACE_ID}"' in line for line in requests), requests


def exported_names(text: str) -> set[str]:
    """Every series name a scrape can hold: each family's, with a histogram's suffixes."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.add(name)
            if kind == "histogram":
                names.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
    return names


def dashboard_expressions() -> list[str]:
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def alert_expressions() -> list[str]:
    rules = yaml.safe_load((DOCS / "prometheus-alerts.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def cluster_scrape() -> str:
    registry = CollectorRegistry()
    ClusterMetrics(registry)
    return generate_latest(registry).decode()


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_dashboard_and_alerts_name_only_exported_metrics(scraped: str, source: str) -> None:
    exported = exported_names(scraped) | exported_names(cluster_scrape())
    expressions = dashboard_expressions() if source == "dashboard" else alert_expressions()
    assert expressions
    named = {name for expr in expressions for name in re.findall(r"\bagentd_\w+", expr)}
    assert named - exported == set()
    # The panels and rules cover what the issue asks of them.
    for wanted in (
        "agentd_requests_total",
        "agentd_lm_kv_blocks_free",
        "agentd_cluster_lease_renewals_total",
        "agentd_plugin_reloads_total",
        "agentd_pool_rejections_total",
    ):
        assert wanted in named, wanted
    if source == "dashboard":
        for wanted in (
            "agentd_agent_turns_total",
            "agentd_agent_turn_duration_seconds_bucket",
            "agentd_request_duration_seconds_bucket",
            "agentd_pool_queue_depth",
            "agentd_gc_pause_seconds_bucket",
            "agentd_event_loop_lag_seconds_bucket",
            "agentd_lm_time_to_first_token_seconds_bucket",
            "agentd_inference_batch_size_bucket",
            "agentd_tool_errors_total",
            "agentd_lm_tokens_generated_total",
        ):
            assert wanted in named, wanted


def test_dashboard_is_importable() -> None:
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"] and all(t["refId"] and t["expr"] for t in panel["targets"])


def test_promtool_check_rules_passes() -> None:
    result = promtool("check", "rules", str(DOCS / "prometheus-alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 10 rules found" in result.stdout
