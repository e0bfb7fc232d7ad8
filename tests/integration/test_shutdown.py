"""SIGTERM drains: in-flight calls finish, new connections are refused, exit status 0."""

from __future__ import annotations

import signal
import socket
import threading
import time

import grpc
import httpx

from agentd.testing import start_server
from agentd.v1 import agent_pb2 as pb
from agentd.v1 import agent_pb2_grpc as pb_grpc
from tests.conftest import PLUGINS


def test_graceful_shutdown_finishes_in_flight_calls():
    server = start_server(["--plugins", str(PLUGINS), "--grace", "10"])
    results: dict[str, object] = {}

    def slow_grpc() -> None:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.AgentServiceStub(channel)
            reply = stub.Invoke(pb.InvokeRequest(agent="slow/a", message=pb.Message(text="1.5")))
            results["grpc"] = reply.message.text

    def slow_connect() -> None:
        r = httpx.post(
            server.url + "/agentd.v1.AgentService/Invoke",
            json={"agent": "slow/b", "message": {"text": "1.5"}},
            timeout=30,
        )
        results["connect"] = (r.status_code, r.json()["message"]["text"])

    try:
        threads = [threading.Thread(target=slow_grpc), threading.Thread(target=slow_connect)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # both calls are now inside the agent
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        # The listener is closed: a new connection is refused.
        refused = False
        try:
            socket.create_connection((server.host, server.port), timeout=2).close()
        except OSError:
            refused = True
        for t in threads:
            t.join(20)
        assert server.process.wait(20) == 0
    finally:
        server.stop()
    assert refused
    assert results == {"grpc": "done", "connect": (200, "done")}
    assert "draining" in server.log()


def test_grace_period_bounds_shutdown():
    server = start_server(["--plugins", str(PLUGINS), "--grace", "0.5"])
    caught: list[BaseException] = []

    def very_slow() -> None:
        try:
            httpx.post(
                server.url + "/agentd.v1.AgentService/Invoke",
                json={"agent": "slow", "message": {"text": "30"}},
                timeout=30,
            )
        except httpx.HTTPError as exc:
            caught.append(exc)

    try:
        thread = threading.Thread(target=very_slow)
        thread.start()
        time.sleep(0.5)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(20) == 0
        assert time.monotonic() - started < 10
        thread.join(10)
    finally:
        server.stop()
    assert caught, "the call cut off by the grace period must fail, not hang"
    assert "cut off" in server.log()
