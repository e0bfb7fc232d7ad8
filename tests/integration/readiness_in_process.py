"""The readiness surfaces asked in process through start, drain and stop (run by
tests/integration/test_readiness.py in a fresh interpreter: the gateway's KServe protos
cannot share a process with tritonclient's)."""

from __future__ import annotations

import asyncio

import httpx

from agentd.gateway.app import Gateway
from agentd.settings import Settings
from tests.conftest import PLUGINS


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
    gateway = Gateway.from_settings(settings)
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
