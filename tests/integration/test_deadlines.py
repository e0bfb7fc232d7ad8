"""A live server with 2 workers, both busy on long turns: a call whose deadline passes
while it waits in the run queue is answered at its deadline (Connect 504 /
DEADLINE_EXCEEDED), not when a worker frees up, and its turn never starts."""

from __future__ import annotations

import concurrent.futures
import time

import grpc
import httpx
import pytest

from agentd.testing import start_server
from agentd.v1 import agent_pb2 as pb
from agentd.v1 import agent_pb2_grpc as pb_grpc
from tests.conftest import PLUGINS, metric_value
from tests.integration.test_protocol_edges import frame, grpc_status, h2_call

INVOKE = "/agentd.v1.AgentService/Invoke"
BUSY_S = 3.0  # each of the two workers is held this long
DEADLINE_MS = 200
# A call answered at its deadline comes back within this (a loaded 2-core machine); one
# answered when a worker frees up takes about BUSY_S.
BOUND_S = 1.2


@pytest.fixture(scope="module")
def two_workers():
    running = start_server(["--plugins", str(PLUGINS)], env={"AGENTD_WORKERS": "2"}, timeout=60)
    yield running
    running.stop()


def _slow_turns(server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics").text
    outcomes = ("ok", "error", "deadline", "cancelled")
    return {
        o: metric_value(text, "agentd_agent_turns_total", agent_type="slow", outcome=o)
        for o in outcomes
    }


def _hold_both_workers(server, stub, pool) -> list[concurrent.futures.Future]:
    busy = [
        pool.submit(
            stub.Invoke,
            pb.InvokeRequest(agent=f"slow/busy{i}", message=pb.Message(text=str(BUSY_S))),
            timeout=30,
        )
        for i in range(2)
    ]
    end = time.monotonic() + 10
    while time.monotonic() < end:
        text = httpx.get(server.url + "/metrics").text
        if metric_value(text, "agentd_pool_busy_workers") == 2:
            return busy
        time.sleep(0.02)
    raise AssertionError("the two slow turns did not start")


def test_calls_waiting_for_a_worker_fail_at_their_deadline_and_never_run(two_workers):
    before = _slow_turns(two_workers)
    with (
        grpc.insecure_channel(two_workers.target) as channel,
        concurrent.futures.ThreadPoolExecutor(4) as pool,
    ):
        stub = pb_grpc.AgentServiceStub(channel)
        busy = _hold_both_workers(two_workers, stub, pool)

        # Connect, JSON over HTTP/1.1, with connect-timeout-ms.
        started = time.monotonic()
        r = httpx.post(
            two_workers.url + INVOKE,
            json={"agent": "slow/connect", "message": {"text": "0"}},
            headers={"connect-timeout-ms": str(DEADLINE_MS)},
            timeout=30,
        )
        connect_s = time.monotonic() - started
        assert r.status_code == 504, r.text
        assert r.json()["code"] == "deadline_exceeded"
        assert connect_s < BOUND_S, connect_s

        # gRPC with grpc-timeout, the stream held open past the deadline: the server
        # itself must answer, at the deadline.
        started = time.monotonic()
        request = pb.InvokeRequest(agent="slow/grpc", message=pb.Message(text="0"))
        response, _, trailers = h2_call(
            two_workers,
            INVOKE,
            [("content-type", "application/grpc"), ("grpc-timeout", f"{DEADLINE_MS}m")],
            frame(request.SerializeToString()),
        )
        grpc_s = time.monotonic() - started
        assert grpc_status(response, trailers)[0] == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        assert grpc_s < BOUND_S, grpc_s

        # A stock grpcio client with a deadline.
        with pytest.raises(grpc.RpcError) as caught:
            stub.Invoke(
                pb.InvokeRequest(agent="slow/grpcio", message=pb.Message(text="0")),
                timeout=DEADLINE_MS / 1000,
            )
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED

        for call in busy:
            assert call.result().message.text == "done"
    time.sleep(0.3)  # a worker is free: an expired call would have started by now
    after = _slow_turns(two_workers)
    # Only the two busy turns ran, both to completion; none of the expired calls started.
    assert after["ok"] - before["ok"] == 2
    assert after["deadline"] == before["deadline"]
    assert after["cancelled"] == before["cancelled"]
    assert after["error"] == before["error"]
