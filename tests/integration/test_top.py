"""``agentd top`` against a real node and against a partial one: the numbers shown are the
ones /metrics says (rates and histograms over the interval between two scrapes), what a node
does not export shows as "-", an unreachable URL is one error line, Ctrl-C exits 0."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from rich.console import Console

from agentd.cli.top import ScrapeError, build_frame, parse_metrics, render, scrape, seconds_text
from agentd.testing import RunningServer, start_server
from tests.conftest import PLUGINS

INVOKE = "/agentd.v1.AgentService/Invoke"
CALL_TOOL = "/agentd.v1.AgentService/CallTool"


@pytest.fixture(scope="module")
def node() -> Iterator[RunningServer]:
    running = start_server(["--plugins", str(PLUGINS)])
    yield running
    running.stop()


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "AGENTD_TOKEN"}
    return subprocess.run(
        [sys.executable, "-m", "agentd", "top", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**env, "COLUMNS": "120"},
    )


def shown(text: str, *cells: str) -> bool:
    """Whether ``cells`` appear next to each other (only spaces between) in a frame."""
    return re.search(r"(?<!\S)" + r" +".join(map(re.escape, cells)) + r"(?!\S)", text) is not None


def total(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` (Prometheus text) whose labels match."""
    found = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            pairs = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
            if all(pairs.get(k) == v for k, v in labels.items()):
                found += float(line.rsplit(" ", 1)[1])
    return found


def p(q: float, before: str, after: str, name: str, **labels: str) -> str:
    """histogram_quantile(q) of the increase of ``name`` between two scrapes, done by hand,
    as top shows it ("-" without observations)."""
    found = {le for le in re.findall(rf'{name}_bucket{{[^}}]*le="([^"]+)"', after) if le != "+Inf"}
    count = total(after, name + "_count", **labels) - total(before, name + "_count", **labels)
    if not count:
        return "-"
    rank, lower, below = q * count, 0.0, 0.0
    for upper, le in sorted((float(le), le) for le in found):
        cumulative = total(after, name + "_bucket", le=le, **labels)
        cumulative -= total(before, name + "_bucket", le=le, **labels)
        if cumulative >= rank:
            return seconds_text(lower + (upper - lower) * (rank - below) / (cumulative - below))
        lower, below = upper, cumulative
    return seconds_text(lower)


def traffic(client: httpx.Client) -> None:
    for i in range(6):
        r = client.post(INVOKE, json={"agent": f"counter/t{i}", "message": {"text": "1"}})
        assert r.status_code == 200, r.text
    assert (
        client.post(INVOKE, json={"agent": "boom/t", "message": {"text": "1"}}).status_code == 500
    )
    for _ in range(2):
        body = {"model": "tinylm", "prompt": "A bee has", "max_tokens": 6, "temperature": 0}
        assert client.post("/v1/completions", json=body).status_code == 200
    features = {"name": "features", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}
    for _ in range(3):
        r = client.post("/v2/models/decision/infer", json={"inputs": [features]})
        assert r.status_code == 200, r.text
    for expression in ("2 + 3", "7 * 6", "2 +"):
        body = {"name": "calc", "argumentsJson": json.dumps({"expression": expression})}
        client.post(CALL_TOOL, json=body)


def test_the_frame_shows_the_numbers_metrics_says(node: RunningServer) -> None:
    with httpx.Client(base_url=node.url, timeout=60) as client:
        before = client.get("/metrics").text
        traffic(client)
        after = client.get("/metrics").text
    # Rates over a stated 2 s: the frame divides by the interval it is given.
    frame = build_frame(parse_metrics(before), parse_metrics(after), 2.0, node.url)
    console = Console(record=True, width=120, file=io.StringIO())
    console.print(render(frame))
    text = console.export_text()

    def per_s(name: str, **labels: str) -> str:
        return f"{(total(after, name, **labels) - total(before, name, **labels)) / 2:.1f}"

    def count(name: str, **labels: str) -> str:
        return f"{total(after, name, **labels):.0f}"

    assert shown(text, "turns/s", per_s("agentd_agent_turns_total"))
    assert per_s("agentd_agent_turns_total") == "3.5"  # 6 counter turns and 1 boom, over 2 s
    assert shown(text, "agents active", count("agentd_agents_active"))
    assert shown(text, "run queue", count("agentd_pool_queue_depth"))
    assert shown(text, "rejections", count("agentd_pool_rejections_total"))
    assert shown(text, "tool calls/s", per_s("agentd_tool_calls_total"))
    assert shown(text, "tool failures/s", per_s("agentd_tool_errors_total"))
    assert per_s("agentd_tool_calls_total") == "1.5" and per_s("agentd_tool_errors_total") == "0.5"
    assert shown(text, "tool failures", count("agentd_tool_errors_total"))

    batches = total(after, "agentd_inference_batch_size_count", model="decision") - total(
        before, "agentd_inference_batch_size_count", model="decision"
    )
    rows = total(after, "agentd_inference_batch_size_sum", model="decision") - total(
        before, "agentd_inference_batch_size_sum", model="decision"
    )
    infer = per_s("agentd_inference_requests_total", model="decision")
    assert shown(text, "decision", f"{rows / batches:.1f}", infer, "-", "-", "-", "-")

    tokens = per_s("agentd_lm_tokens_generated_total", model="tinylm")
    assert float(tokens) >= 1.0
    ttft = "agentd_lm_time_to_first_token_seconds"
    p50 = p(0.5, before, after, ttft, model="tinylm").split()
    p99 = p(0.99, before, after, ttft, model="tinylm").split()
    assert p50 != ["-"]
    used = total(after, "agentd_lm_kv_blocks_used", model="tinylm")
    blocks = f"{used:.0f}/{used + total(after, 'agentd_lm_kv_blocks_free', model='tinylm'):.0f}"
    assert shown(text, "tinylm", "-", "-", tokens, *p50, *p99, blocks), text

    errors = total(after, "agentd_request_errors_total", code="500")
    assert shown(text, "500", f"{errors:.0f}", per_s("agentd_request_errors_total", code="500"))
    gc = p(0.99, before, after, "agentd_gc_pause_seconds")
    assert shown(text, "GC pause p99", *gc.split()), gc
    lag = p(0.99, before, after, "agentd_event_loop_lag_seconds")
    assert shown(text, "loop lag p99", *lag.split()), lag


def test_once_prints_one_frame_of_a_live_node(node: RunningServer) -> None:
    with httpx.Client(base_url=node.url, timeout=60) as client:
        client.post(INVOKE, json={"agent": "boom/o", "message": {"text": "1"}})
        result = cli("--url", node.url, "--once", "--interval", "0.2")
        metrics = client.get("/metrics").text
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    text = result.stdout
    assert text.count("agentd top") == 1 and "rates over 0.2 s" in text
    assert shown(text, "agents active", f"{total(metrics, 'agentd_agents_active'):.0f}")
    assert shown(text, "turns/s", "0.0")  # nothing ran between the two scrapes
    errors = total(metrics, "agentd_request_errors_total", code="500")
    assert errors >= 1 and shown(text, "500", f"{errors:.0f}", "0.0")
    assert shown(text, "decision") and shown(text, "tinylm")


# A node that exports only some metrics (an older node), with an exemplar and an odd line.
PARTIAL = """\
# HELP agentd_agents_active Agent instances in memory.
# TYPE agentd_agents_active gauge
agentd_agents_active 3.0
# TYPE agentd_inference_batch_size histogram
agentd_inference_batch_size_bucket{{model="m",le="1.0"}} {b1}
agentd_inference_batch_size_bucket{{model="m",le="+Inf"}} {b2}
agentd_inference_batch_size_sum{{model="m"}} {bsum}
agentd_inference_batch_size_count{{model="m"}} {b2}
# TYPE agentd_lm_time_to_first_token_seconds histogram
agentd_lm_time_to_first_token_seconds_bucket{{model="m",le="0.01"}} {t1}
agentd_lm_time_to_first_token_seconds_bucket{{model="m",le="0.1"}} {t2} # {{trace_id="a1"}} 0.05
agentd_lm_time_to_first_token_seconds_bucket{{model="m",le="+Inf"}} {t2}
agentd_lm_time_to_first_token_seconds_count{{model="m"}} {t2}
this line is not a sample
"""
BODIES = [
    PARTIAL.format(b1=0, b2=0, bsum=0, t1=0, t2=0),
    PARTIAL.format(b1=1, b2=4, bsum=12, t1=2, t2=10),
]


class FakeNode:
    """An http.server answering /metrics with each of ``bodies`` in turn (the last one
    again after that); counts the scrapes."""

    def __init__(self, bodies: list[str], content_type: str = "text/plain; version=0.0.4"):
        self.scrapes = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = bodies[min(fake.scrapes, len(bodies) - 1)].encode()
                fake.scrapes += 1
                self.send_response(200)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def partial_node() -> Iterator[FakeNode]:
    fake = FakeNode(BODIES)
    yield fake
    fake.close()


def test_a_node_lacking_metrics_shows_dashes(partial_node: FakeNode) -> None:
    result = cli("--url", partial_node.url, "--once", "--interval", "0.1")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert shown(text, "agents active", "3")
    for label in (
        "turns/s",
        "run queue",
        "rejections",
        "tool calls/s",
        "tool failures",
        "GC pause p99",
        "loop lag p99",
    ):
        assert shown(text, label, "-"), label
    # batch: 12 rows in 4 runs; TTFT: 2 of 10 under 10 ms, the rest under 100 ms, so p50 is
    # 10 + 90 * (5 - 2) / 8 ms and p99 10 + 90 * (9.9 - 2) / 8 ms (linear in the bucket)
    assert shown(text, "m", "3.0", "-", "-", "43.8", "ms", "98.9", "ms", "-"), text
    assert shown(text, "(none)", "-", "-")  # no error counter at all


def test_an_answer_without_agentd_metrics_is_refused() -> None:
    fake = FakeNode(["<html>hello</html>"], content_type="text/html")
    try:
        with httpx.Client() as client, pytest.raises(ScrapeError, match="no agentd metrics"):
            scrape(client, fake.url)
    finally:
        fake.close()


def test_an_unreachable_url_is_one_error_line_and_exit_1() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed on leaving: nothing listens there
    result = cli("--url", f"http://127.0.0.1:{port}", "--once")
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot reach http://127.0.0.1:{port}")


@pytest.mark.parametrize("interval", ["0", "nan"])
def test_an_interval_that_is_not_a_sane_number_of_seconds_is_refused(interval: str) -> None:
    result = cli("--interval", interval, "--url", "http://127.0.0.1:9", "--once")
    assert result.returncode == 2
    assert result.stderr == "error: --interval must be a number of seconds from 0.1 to 3600\n"


def test_ctrl_c_leaves_cleanly(partial_node: FakeNode) -> None:
    env = {**os.environ, "COLUMNS": "120"}
    args = [sys.executable, "-m", "agentd", "top", "--url", partial_node.url, "--interval", "0.1"]
    with subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as process:
        deadline = time.monotonic() + 60
        while partial_node.scrapes < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert partial_node.scrapes >= 3  # refreshing: past the first frame
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 0
    assert err == ""
    assert shown(out, "agents active", "3")  # the last frame stays
