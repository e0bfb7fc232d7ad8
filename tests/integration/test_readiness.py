"""One readiness on a live server: ``/readyz``, KServe ``/v2/health/ready``, KServe gRPC
``ServerReady`` and gRPC health ``Check`` all say not ready as soon as it drains (SIGTERM)
while an in-flight call still completes. (On the wire a start is atomic: Envoy holds the
first requests until the app has started. tests/unit/gateway/test_readiness.py drives the
start in process, where the surfaces used to disagree.)"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentd.testing import start_server
from tests.conftest import PLUGINS

SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass
class Probes:
    """The node's readiness surfaces, over connections opened before they are asked."""

    http: httpx.Client
    channel: grpc.Channel

    def kserve_rest(self) -> bool:
        return self.http.get("/v2/health/ready").status_code == 200

    def readyz(self) -> bool:
        return self.http.get("/readyz").status_code == 200

    def grpc_health(self, service: str = "") -> bool:
        stub = health_pb2_grpc.HealthStub(self.channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        return reply.status == SERVING

    def kserve_grpc(self) -> bool:
        # Raw bytes: this process must not load agentd's copy of the KServe protos beside
        # tritonclient's. ServerReadyResponse is `bool ready = 1`: b"\x08\x01" when true.
        ready = self.channel.unary_unary(
            "/inference.GRPCInferenceService/ServerReady",
            request_serializer=lambda raw: raw,
            response_deserializer=lambda raw: raw,
        )
        return ready(b"", timeout=2) == b"\x08\x01"

    def round(self) -> list[bool]:
        """Every surface once, KServe's first (it used to turn ready before the node)."""
        return [
            self.kserve_rest(),
            self.kserve_grpc(),
            self.readyz(),
            self.grpc_health(),
            self.grpc_health("agentd.v1.AgentService"),
        ]


def test_a_draining_node_is_not_ready_anywhere_while_its_call_completes():
    server = start_server(["--plugins", str(PLUGINS), "--grace", "15"])
    result: dict[str, object] = {}

    def slow_call() -> None:
        response = httpx.post(
            server.url + "/agentd.v1.AgentService/Invoke",
            json={"agent": "slow/drain", "message": {"text": "6"}},
            timeout=30,
        )
        result["call"] = (response.status_code, response.json()["message"]["text"])

    caller = threading.Thread(target=slow_call)
    try:
        with (
            httpx.Client(base_url=server.url, timeout=5) as http,
            grpc.insecure_channel(server.target) as channel,
        ):
            probes = Probes(http, channel)
            assert probes.round() == [True] * 5
            caller.start()
            time.sleep(0.5)  # the call is inside the agent now
            server.process.send_signal(signal.SIGTERM)
            # The node hears of the drain from `agentd serve` (it polls for the signal
            # every 0.2 s); the call has seconds left.
            end = time.monotonic() + 3
            while probes.readyz() and time.monotonic() < end:
                time.sleep(0.02)
            draining = probes.round()
            reason = http.get("/readyz")
            assert "call" not in result, "the slow call was still in flight"
        caller.join(30)
        assert server.process.wait(30) == 0
    finally:
        server.stop()
    assert draining == [False] * 5
    assert reason.status_code == 503 and "draining" in reason.text
    assert result["call"] == (200, "done")


def test_the_surfaces_agree_in_process_through_start_drain_and_stop():
    # In a fresh interpreter: the gateway loads agentd's KServe protos, which cannot share
    # a process with tritonclient's (other tests of this session import it).
    inproc = Path(__file__).with_name("readiness_in_process.py")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(inproc)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout, done.stdout
