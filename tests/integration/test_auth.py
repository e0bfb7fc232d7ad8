"""Bearer-token auth: off by default (the shared server), on when tokens are configured."""

from __future__ import annotations

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentd.testing import start_server
from agentd.v1 import agent_pb2 as pb
from agentd.v1 import agent_pb2_grpc as pb_grpc

INVOKE = "/agentd.v1.AgentService/Invoke"


@pytest.fixture(scope="module")
def secured():
    running = start_server(env={"AGENTD_AUTH_TOKENS": "s3cret,other-token"})
    yield running
    running.stop()


def test_auth_off_by_default(http):
    assert http.post(INVOKE, json={"agent": "echo"}).status_code == 200


def test_connect_without_token_401(secured):
    r = httpx.post(secured.url + INVOKE, json={"agent": "echo"})
    assert r.status_code == 401
    assert r.json()["code"] == "unauthenticated"
    assert r.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "value", ["Bearer wrong", "s3cret", "Basic czNjcmV0", "Bearer s3cret2", "bearer"]
)
def test_connect_bad_token_401(secured, value):
    r = httpx.post(secured.url + INVOKE, json={"agent": "echo"}, headers={"authorization": value})
    assert r.status_code == 401


@pytest.mark.parametrize("token", ["s3cret", "other-token"])
def test_connect_with_token_200(secured, token):
    r = httpx.post(
        secured.url + INVOKE, json={"agent": "echo"}, headers={"authorization": f"Bearer {token}"}
    )
    assert r.status_code == 200


def test_grpc_without_token_unauthenticated(secured):
    with grpc.insecure_channel(secured.target) as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Invoke(pb.InvokeRequest(agent="echo"))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = stub.Invoke(
            pb.InvokeRequest(agent="echo", message=pb.Message(text="ok")),
            metadata=[("authorization", "Bearer s3cret")],
        )
        assert reply.message.text == "ok"


def test_probes_stay_open(secured):
    assert httpx.get(secured.url + "/healthz").status_code == 200
    assert httpx.get(secured.url + "/readyz").status_code == 200
    assert httpx.get(secured.url + "/metrics").status_code == 401
    with grpc.insecure_channel(secured.target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status
    assert status == health_pb2.HealthCheckResponse.SERVING
