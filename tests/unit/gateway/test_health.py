"""HealthState: the node's one readiness, through its phases and checks (no sockets)."""

from __future__ import annotations

import asyncio

import pytest
from connectrpc.errors import ConnectError
from grpc_health.v1 import health_pb2

from agentd.gateway.health import HealthState, Phase

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _statuses(health: HealthState) -> list[int | None]:
    return [health.get(""), health.get("svc")]


def test_only_a_serving_node_is_ready_and_every_service_says_the_same():
    health = HealthState(["svc"])
    reasons = {}
    for phase in (Phase.STARTING, Phase.SERVING, Phase.DRAINING, Phase.STOPPED):
        health.set_phase(phase)
        reasons[phase] = health.not_ready_reason()
        expected = SERVING if phase is Phase.SERVING else NOT_SERVING
        assert _statuses(health) == [expected, expected]
        assert health.ready() is (phase is Phase.SERVING)
    assert reasons == {
        Phase.STARTING: "starting",
        Phase.SERVING: None,
        Phase.DRAINING: "draining (finishing in-flight calls before it stops)",
        Phase.STOPPED: "stopped",
    }
    assert health.get("unknown") is None


def test_a_failing_check_makes_every_surface_not_ready():
    health = HealthState(["svc"])
    health.set_phase(Phase.SERVING)
    failing: list[str] = []
    health.add_check(lambda: failing[0] if failing else None)
    assert health.ready()
    failing.append("state store: the last 3 commits failed")
    assert health.not_ready_reason() == "state store: the last 3 commits failed"
    assert _statuses(health) == [NOT_SERVING, NOT_SERVING]


def test_a_stopped_node_stays_stopped():
    health = HealthState([])
    health.set_phase(Phase.STOPPED)
    health.set_phase(Phase.SERVING)
    assert health.phase is Phase.STOPPED and not health.ready()


async def test_check_answers_unknown_services_not_found():
    health = HealthState(["svc"])
    health.set_phase(Phase.SERVING)
    reply = await health.check(health_pb2.HealthCheckRequest(service="svc"), None)  # type: ignore[arg-type]
    assert reply.status == SERVING
    with pytest.raises(ConnectError, match="unknown service"):
        await health.check(health_pb2.HealthCheckRequest(service="nope"), None)  # type: ignore[arg-type]


async def test_watch_follows_the_phase():
    health = HealthState(["svc"])
    watch = health.watch(health_pb2.HealthCheckRequest(service="svc"), None)  # type: ignore[arg-type]
    assert (await anext(watch)).status == NOT_SERVING  # starting
    nxt = asyncio.ensure_future(anext(watch))
    await asyncio.sleep(0)
    health.set_phase(Phase.SERVING)
    assert (await asyncio.wait_for(nxt, 2)).status == SERVING
    nxt = asyncio.ensure_future(anext(watch))
    await asyncio.sleep(0)
    health.set_phase(Phase.DRAINING)
    assert (await asyncio.wait_for(nxt, 2)).status == NOT_SERVING
    await watch.aclose()
