"""The gateway's routing, called in process through ASGI (no Envoy, no sockets): route
labels, auth on closed and open paths, unknown methods and paths in the caller's protocol,
405s, the body limit, and the lifespan (run by test_routing.py in a fresh interpreter: the
gateway's KServe protos cannot share a process with tritonclient's)."""

from __future__ import annotations

import struct
from urllib.parse import unquote

import orjson
import pytest

from agentd.gateway.app import Gateway
from agentd.node import Node, NodeOptions
from agentd.settings import Settings
from agentd.testing import AsgiLifespan, asgi_request
from tests.conftest import PLUGINS

LIMIT = 1024
TOKEN = "s3cret-token"
GRPC = {"content-type": "application/grpc", "te": "trailers"}
GRPC_WEB = {"content-type": "application/grpc-web+proto"}
JSON = {"content-type": "application/json"}
UNIMPLEMENTED, UNAUTHENTICATED, RESOURCE_EXHAUSTED = 12, 16, 8


def _settings(tmp_path, **overrides) -> Settings:
    values = {
        "plugins": PLUGINS,
        "state_path": tmp_path / "agents.db",
        "tools_cache_dir": tmp_path / "tools",  # nothing built: no sandbox to load
        "max_body_bytes": LIMIT,
    }
    return Settings(**{**values, **overrides})


@pytest.fixture
def gateway(tmp_path) -> Gateway:
    """A gateway over a node built and not started: routing needs no running service."""
    return Gateway(Node(_settings(tmp_path)))


@pytest.fixture
def guarded(tmp_path) -> Gateway:
    return Gateway(Node(_settings(tmp_path, auth_tokens=[TOKEN])))


def _requests(gateway: Gateway, label: str) -> dict[tuple[str, str], float]:
    """{(protocol, code): count} of agentd_requests_total for ``label``."""
    found = {}
    for family in gateway.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "agentd_requests_total" and sample.labels["method"] == label:
                found[(sample.labels["protocol"], sample.labels["code"])] = sample.value
    return found


def _frame(message: bytes) -> bytes:
    return struct.pack(">BI", 0, len(message)) + message


# -- route labels ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "headers", "label", "protocol"),
    [
        ("GET", "/healthz", {}, "/healthz", "http"),
        ("GET", "/", {}, "/", "http"),
        ("GET", "/v1/tools", {}, "/v1/tools", "http"),
        ("GET", "/v1/models", {}, "/v1/models", "http"),
        ("GET", "/v1/models/tinylm", {}, "/v1/models/{model}", "http"),
        ("GET", "/v2", {}, "/v2", "http"),
        ("GET", "/v2/health/live", {}, "/v2/health/live", "http"),
        ("GET", "/v2/models/m-1", {}, "/v2/models/{name}", "http"),
        (
            "GET",
            "/v2/models/m-1/versions/7/ready",
            {},
            "/v2/models/{name}/versions/{version}/ready",
            "http",
        ),
        ("POST", "/v2/models/m-1/infer", JSON, "/v2/models/{name}/infer", "http"),
        ("POST", "/v2/repository/index", JSON, "/v2/repository/index", "http"),
        (
            "POST",
            "/v2/repository/models/nope/unload",
            JSON,
            "/v2/repository/models/{name}/unload",
            "http",
        ),
        ("GET", "/v2/models", {}, "other", "http"),
        ("GET", "/v2nothing", {}, "other", "http"),
        ("GET", "/no/such/path", {}, "other", "http"),
        (
            "POST",
            "/grpc.health.v1.Health/Check",
            JSON,
            "/grpc.health.v1.Health/Check",
            "connect",
        ),
        ("POST", "/agentd.v1.AgentService/Nope", GRPC, "other", "grpc"),
        (
            "POST",
            "/agentd.v1.AgentService/Invoke",
            GRPC_WEB,
            "/agentd.v1.AgentService/Invoke",
            "grpc-web",
        ),
    ],
)
async def test_each_request_is_counted_under_its_route_label(
    gateway, method, path, headers, label, protocol
):
    body = b"{}" if headers is JSON else b""
    response = await asgi_request(gateway, method, path, headers=headers, body=body)
    assert response.status > 0
    counted = _requests(gateway, label)
    assert [p for p, _ in counted] == [protocol], counted
    assert sum(counted.values()) == 1


async def test_a_model_name_never_becomes_a_label(gateway):
    for name in ("a", "b", "c"):
        await asgi_request(gateway, "GET", f"/v2/models/{name}/ready")
        await asgi_request(gateway, "GET", f"/v1/models/{name}")
    assert sum(_requests(gateway, "/v2/models/{name}/ready").values()) == 3
    assert sum(_requests(gateway, "/v1/models/{model}").values()) == 3


# -- auth -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/metrics", "/", "/v1/tools", "/v1/models", "/v2", "/v2/models/x", "/no/such"]
)
async def test_closed_paths_need_the_token(guarded, path):
    refused = await asgi_request(guarded, "GET", path)
    assert refused.status == 401
    assert refused.json()["code"] == "unauthenticated"
    assert refused.header("www-authenticate") == 'Bearer realm="agentd"'
    wrong = await asgi_request(guarded, "GET", path, headers={"authorization": "Bearer nope"})
    assert wrong.status == 401
    allowed = await asgi_request(guarded, "GET", path, headers={"authorization": f"Bearer {TOKEN}"})
    assert allowed.status != 401


@pytest.mark.parametrize(
    ("path", "status"),
    [("/healthz", 200), ("/readyz", 503), ("/v2/health/live", 200), ("/v2/health/ready", 400)],
)
async def test_probes_are_open(guarded, path, status):
    assert (await asgi_request(guarded, "GET", path)).status == status


async def test_grpc_health_is_open_and_other_methods_are_not(guarded):
    health = await asgi_request(
        guarded, "POST", "/grpc.health.v1.Health/Check", headers=JSON, body=b"{}"
    )
    assert health.status == 200
    assert health.json() == {"status": "NOT_SERVING"}  # built, not started
    invoke = await asgi_request(
        guarded, "POST", "/agentd.v1.AgentService/Invoke", headers=GRPC, body=_frame(b"")
    )
    assert invoke.status == 200
    assert invoke.grpc_status == UNAUTHENTICATED


# -- unknown methods and paths ----------------------------------------------------------------


async def test_an_unknown_method_is_unimplemented_in_the_callers_protocol(gateway):
    path = "/agentd.v1.AgentService/Nope"
    grpc = await asgi_request(gateway, "POST", path, headers=GRPC, body=_frame(b""))
    assert (grpc.status, grpc.grpc_status) == (200, UNIMPLEMENTED)
    assert unquote(grpc.header("grpc-message")) == f"unknown method {path}"
    web = await asgi_request(gateway, "POST", path, headers=GRPC_WEB, body=_frame(b""))
    assert (web.status, web.grpc_status) == (200, UNIMPLEMENTED)
    connect = await asgi_request(gateway, "POST", path, headers=JSON, body=b"{}")
    assert connect.status == 404
    assert connect.json() == {"code": "unimplemented", "message": f"unknown method {path}"}


async def test_unknown_paths_are_404_or_unimplemented_for_grpc(gateway):
    plain = await asgi_request(gateway, "GET", "/nope")
    assert plain.status == 404
    assert plain.json() == {"code": "not_found", "message": "no route for /nope"}
    grpc = await asgi_request(gateway, "POST", "/nope", headers=GRPC)
    assert grpc.grpc_status == UNIMPLEMENTED
    under_v2 = await asgi_request(gateway, "GET", "/v2nothing")
    assert under_v2.status == 404
    assert under_v2.json()["code"] == "not_found"
    kserve = await asgi_request(gateway, "GET", "/v2/models")
    assert kserve.status == 404
    long = "/x" * 200
    assert len((await asgi_request(gateway, "GET", long)).json()["message"]) < 150


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/", "/v1/tools"])
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
async def test_ops_routes_answer_405_to_other_methods(gateway, path, method):
    response = await asgi_request(gateway, method, path, body=b"x")
    assert response.status == 405
    assert response.header("allow") == "GET, HEAD"
    assert response.json()["code"] == "invalid_argument"


# -- the body limit ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/v2/models/decision/infer", JSON),
        ("/v2/repository/index", JSON),
        ("/agentd.v1.AgentService/Invoke", JSON),
        ("/agentd.v1.AgentService/Invoke", {"content-type": "application/proto"}),
    ],
)
async def test_a_body_over_the_limit_is_413(gateway, path, headers):
    declared = await asgi_request(
        gateway, "POST", path, headers={**headers, "content-length": str(LIMIT + 1)}, body=b""
    )
    assert declared.status == 413
    assert declared.json() == {
        "code": "resource_exhausted",
        "message": f"request body is larger than the limit of {LIMIT} bytes",
    }
    streamed = await asgi_request(gateway, "POST", path, headers=headers, body=[b"x" * 600] * 2)
    assert streamed.status == 413


async def test_a_grpc_body_over_the_limit_is_resource_exhausted(gateway):
    path = "/agentd.v1.AgentService/Invoke"
    declared = await asgi_request(
        gateway, "POST", path, headers={**GRPC, "content-length": str(LIMIT + 1)}
    )
    assert (declared.status, declared.grpc_status) == (200, RESOURCE_EXHAUSTED)
    streamed = await asgi_request(
        gateway, "POST", path, headers=GRPC, body=[_frame(b"x" * 600)[:600], b"x" * 600]
    )
    assert streamed.grpc_status == RESOURCE_EXHAUSTED


async def test_a_body_at_the_limit_passes(gateway):
    # An unknown agent type: answered without a running node, once the body was read.
    body = orjson.dumps({"agent": "nope", "message": {"text": "x" * (LIMIT - 40)}})
    assert len(body) <= LIMIT
    response = await asgi_request(
        gateway, "POST", "/agentd.v1.AgentService/Invoke", headers=JSON, body=body
    )
    assert response.status == 404, response.body


# -- the lifespan -----------------------------------------------------------------------------


async def test_the_lifespan_starts_and_stops_the_node(tmp_path):
    gateway = Gateway.from_settings(_settings(tmp_path))
    async with AsgiLifespan(gateway) as started:
        assert started == {"type": "lifespan.startup.complete"}
        assert (await asgi_request(gateway, "GET", "/readyz")).status == 200
        invoke = await asgi_request(
            gateway,
            "POST",
            "/agentd.v1.AgentService/Invoke",
            headers=JSON,
            body=b'{"agent": "echo", "message": {"text": "hi"}}',
        )
        assert invoke.status == 200
        assert invoke.json()["message"]["text"] == "hi"
    assert not gateway.node.started
    ready = await asgi_request(gateway, "GET", "/readyz")
    assert (ready.status, ready.body) == (503, b"not ready: stopped\n")


async def test_a_failed_start_is_reported_as_lifespan_startup_failed(tmp_path):
    state = tmp_path / "state"
    state.mkdir()  # the runtime's state store cannot open a directory: it starts last
    gateway = Gateway.from_settings(_settings(tmp_path, state_path=state))
    async with AsgiLifespan(gateway) as answer:
        assert answer["type"] == "lifespan.startup.failed"
        assert answer["message"].startswith("OperationalError: "), answer
        assert "\n" not in answer["message"]
    # What had started was closed again; the node says it is stopped.
    assert not gateway.node.started
    assert not gateway.node.inference.ready()
    ready = await asgi_request(gateway, "GET", "/readyz")
    assert (ready.status, ready.body) == (503, b"not ready: stopped\n")


async def test_a_gateway_over_an_open_node_leaves_its_lifecycle_to_the_opener(tmp_path):
    node = Node(_settings(tmp_path))
    async with node:
        gateway = Gateway(node)
        async with AsgiLifespan(gateway) as started:
            assert started == {"type": "lifespan.startup.complete"}
            assert (await asgi_request(gateway, "GET", "/readyz")).status == 200
        assert node.started  # the gateway did not start it, so it does not close it
    assert not node.started


def test_a_gateway_needs_a_full_node(tmp_path):
    for options in (
        NodeOptions(generation=False),
        NodeOptions(tools=False),
        NodeOptions(metrics=False, generation=False),
    ):
        node = Node(_settings(tmp_path), options=options)
        with pytest.raises(ValueError, match="metrics, language models and tools"):
            Gateway(node)
        assert not node.started
