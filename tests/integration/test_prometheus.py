"""A real Prometheus (Debian's ``prometheus``, installed by ``make test``) scrapes a node
started by the test: PromQL over its HTTP API answers the turn rate and the p99 turn
latency, the alert rules in docs/ load, and OpenMetrics exemplars carry trace ids."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agentd.testing import RunningServer, start_server
from tests.conftest import PLUGINS

INVOKE = "/agentd.v1.AgentService/Invoke"
ALERTS = Path(__file__).parents[2] / "docs" / "prometheus-alerts.yml"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def node() -> Iterator[RunningServer]:
    running = start_server(["--plugins", str(PLUGINS)])
    yield running
    running.stop()


@pytest.fixture(scope="module")
def prometheus(node: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: `make system-test-deps` installs it"
    folder = tmp_path_factory.mktemp("prometheus")
    config = folder / "prometheus.yml"
    config.write_text(
        f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: ["{ALERTS}"]
scrape_configs:
  - job_name: agentd
    static_configs:
      - targets: ["{node.target}"]
"""
    )
    port = free_port()
    log = (folder / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--enable-feature=exemplar-storage",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, (folder / "prometheus.log").read_text()
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "prometheus not ready in 20 s"
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()  # by its PID
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture(scope="module")
def traffic(node: RunningServer, prometheus: str) -> Iterator[None]:
    """Invokes (some traced) every 50 ms while the tests query."""
    stop = threading.Event()

    def send() -> None:
        with httpx.Client(base_url=node.url, timeout=30) as client:
            i = 0
            while not stop.is_set():
                headers = {"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"} if i % 2 else {}
                client.post(
                    INVOKE, json={"agent": f"echo/p{i % 8}", "message": {}}, headers=headers
                )
                i += 1
                stop.wait(0.05)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(30)


def query_until(prometheus: str, path: str, params: dict[str, str], found) -> object:
    """Poll the HTTP API until ``found(data)`` holds (15 s at most); return the data."""
    deadline = time.monotonic() + 15
    while True:
        r = httpx.get(f"{prometheus}{path}", params=params, timeout=5)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "success", body
        if found(body["data"]):
            return body["data"]
        assert time.monotonic() < deadline, f"no data for {params} in 15 s: {body}"
        time.sleep(0.5)


def positive(data: dict) -> bool:
    result = data["result"]
    return bool(result) and float(result[0]["value"][1]) > 0


def test_turn_rate_and_p99_turn_latency(prometheus: str, traffic: None) -> None:
    rate = query_until(
        prometheus,
        "/api/v1/query",
        {"query": 'sum(rate(agentd_agent_turns_total{job="agentd"}[5s]))'},
        positive,
    )
    assert float(rate["result"][0]["value"][1]) > 0  # turns/s
    p99 = query_until(
        prometheus,
        "/api/v1/query",
        {
            "query": "histogram_quantile(0.99, sum by (le) "
            "(rate(agentd_agent_turn_duration_seconds_bucket[5s])))"
        },
        positive,
    )
    assert 0 < float(p99["result"][0]["value"][1]) < 30  # seconds, within the buckets


def test_alert_rules_load(prometheus: str) -> None:
    data = query_until(prometheus, "/api/v1/rules", {}, lambda d: bool(d["groups"]))
    names = {rule["name"] for group in data["groups"] for rule in group["rules"]}
    assert {"AgentdOverloadRejecting", "AgentdKvCacheExhausted", "AgentdClusterLeaseLoss"} <= names
    assert all(rule["health"] != "err" for group in data["groups"] for rule in group["rules"])


def test_exemplars_scraped_with_trace_ids(prometheus: str, traffic: None) -> None:
    # Prometheus asks for OpenMetrics: the traced requests' ids come back as exemplars.
    def has_trace(data: list) -> bool:
        return any(
            exemplar["labels"].get("trace_id") == TRACE_ID
            for series in data
            for exemplar in series["exemplars"]
        )

    now = time.time()
    query_until(
        prometheus,
        "/api/v1/query_exemplars",
        {
            "query": "agentd_request_duration_seconds_bucket",
            "start": str(now - 60),
            "end": str(now + 60),
        },
        has_trace,
    )
