"""Overload: far more calls than the run queue holds. Every call either completes or is
refused up front (RESOURCE_EXHAUSTED / 429); memory and queue depth stay bounded."""

from __future__ import annotations

import concurrent.futures
import re
from pathlib import Path

import grpc
import httpx
import pytest

from agentd.testing import start_server
from agentd.v1 import agent_pb2 as pb
from agentd.v1 import agent_pb2_grpc as pb_grpc
from tests.conftest import PLUGINS, metric_value


@pytest.fixture(scope="module")
def small_server():
    running = start_server(
        ["--plugins", str(PLUGINS)],
        env={"AGENTD_WORKERS": "2", "AGENTD_MAX_QUEUED_TURNS": "8"},
    )
    yield running
    running.stop()


def _rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))


def _envoy_pid(server) -> int:
    # The gateway runs inside Envoy, the child of `agentd serve`.
    pid = server.process.pid
    return int(Path(f"/proc/{pid}/task/{pid}/children").read_text().split()[0])


def test_flood_is_refused_up_front_and_memory_stays_bounded(small_server):
    envoy = _envoy_pid(small_server)
    with grpc.insecure_channel(small_server.target) as channel:
        stub = pb_grpc.AgentServiceStub(channel)

        def call(i: int) -> grpc.StatusCode:
            try:
                stub.Invoke(
                    pb.InvokeRequest(agent=f"slow/{i}", message=pb.Message(text="0.05")),
                    timeout=30,
                )
            except grpc.RpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        rss_before = _rss_kb(envoy)
        peak_depth = 0.0
        codes: list[grpc.StatusCode] = []
        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            for _round in range(5):
                futures = [pool.submit(call, i) for i in range(400)]
                text = httpx.get(small_server.url + "/metrics").text
                peak_depth = max(peak_depth, metric_value(text, "agentd_pool_queue_depth"))
                codes += [f.result() for f in futures]
        rss_after = _rss_kb(envoy)

    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert codes.count(grpc.StatusCode.OK) > 0
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) > 0
    assert peak_depth <= 8
    # 2000 calls, most refused: the server's memory grows by well under what queuing
    # them would cost (and by far less than 2000 agents' worth of anything large).
    assert rss_after - rss_before < 50_000, (rss_before, rss_after)
    text = httpx.get(small_server.url + "/metrics").text
    assert metric_value(text, "agentd_pool_rejections_total") == codes.count(
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )


def test_connect_overload_is_429(small_server):
    with httpx.Client(base_url=small_server.url, timeout=30) as client:

        def call(i: int) -> int:
            return client.post(
                "/agentd.v1.AgentService/Invoke",
                json={"agent": f"slow/h{i}", "message": {"text": "0.2"}},
            ).status_code

        with concurrent.futures.ThreadPoolExecutor(40) as pool:
            statuses = list(pool.map(call, range(80)))
    assert set(statuses) <= {200, 429}
    assert 429 in statuses and 200 in statuses
