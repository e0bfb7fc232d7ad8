"""One readiness on a live server: ``/readyz``, KServe ``/v2/health/ready``, KServe gRPC
``ServerReady`` and gRPC health ``Check`` all say not ready as soon as it drains (SIGTERM)
while an in-flight call still completes. (On the wire a start is atomic: Envoy holds the
first requests until the app has started. tests/unit/gateway/test_readiness.py drives the
start in process, where the surfaces used to disagree.)"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from dataclasses import dataclass

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentd.gateway.app import Gateway
from agentd.settings import Settings
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


class _AsgiProbes:
    """The same surfaces asked in process, through the gateway's ASGI app with httpx (gRPC
    health and KServe ServerReady as Connect JSON calls)."""

    def __init__(self, gateway: Gateway) -> None:
        self.http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=gateway), base_url="http://node"
        )

    async def _connect(self, path: str, body: dict) -> dict:
        response = await self.http.post(path, json=body)
        assert response.status_code == 200, response.text
        return response.json()

    async def round(self) -> list[bool]:
        kserve = (await self.http.get("/v2/health/ready")).status_code == 200
        server_ready = await self._connect("/inference.GRPCInferenceService/ServerReady", {})
        readyz = (await self.http.get("/readyz")).status_code == 200
        node = await self._connect("/grpc.health.v1.Health/Check", {"service": ""})
        agents = await self._connect(
            "/grpc.health.v1.Health/Check", {"service": "agentd.v1.AgentService"}
        )
        return [
            kserve,
            server_ready.get("ready", False),
            readyz,
            node["status"] == "SERVING",
            agents["status"] == "SERVING",
        ]


async def test_the_surfaces_agree_through_start_drain_and_stop(tmp_path):
    settings = Settings(
        plugins=PLUGINS,
        state_path=tmp_path / "agents.db",
        tools_cache_dir=tmp_path / "tools",  # nothing built: no sandbox to load
    )
    gateway = Gateway(settings)
    probes = _AsgiProbes(gateway)
    lifespan: asyncio.Queue[dict] = asyncio.Queue()
    sent: list[str] = []

    async def send(message: dict) -> None:
        sent.append(message["type"])

    assert await probes.round() == [False] * 5  # built, not started
    await lifespan.put({"type": "lifespan.startup"})
    running = asyncio.create_task(gateway({"type": "lifespan"}, lifespan.get, send))
    rounds = []
    while "lifespan.startup.complete" not in sent:
        assert not running.done(), running
        rounds.append(await probes.round())
        await asyncio.sleep(0.005)  # the probes may not suspend: let the start go on
    assert rounds, "the probes ran while the node started"
    for answers in rounds:
        # Asked in order while the start goes on: readiness may turn on between two
        # questions (Falses, then Trues), never the other way round.
        assert answers == sorted(answers), f"surfaces disagree while starting: {answers}"
    assert await probes.round() == [True] * 5
    gateway.start_draining()
    assert await probes.round() == [False] * 5
    assert "draining" in (await probes.http.get("/readyz")).text
    await lifespan.put({"type": "lifespan.shutdown"})
    await asyncio.wait_for(running, 30)
    assert await probes.round() == [False] * 5
    await probes.http.aclose()
