"""The route table (agentd.gateway.routes) against the routers that serve the routes."""

from agentd.gateway.health import HealthState
from agentd.gateway.kserve.rest import _FIXED, RouteKind, match_route
from agentd.gateway.kserve.rest import OPEN_PATHS as KSERVE_OPEN_PATHS
from agentd.gateway.model_admin import ModelAdmin
from agentd.gateway.openai.routes import OpenAIRoutes
from agentd.gateway.ops import OPEN_PATHS, OpsRoutes
from agentd.gateway.plugins_api import PLUGINS_PATH
from agentd.gateway.routes import HTTP_ROUTES
from agentd.gateway.tools_api import TOOLS_PATH
from agentd.observability import Metrics


def _openai() -> OpenAIRoutes:
    return OpenAIRoutes(None, max_body_bytes=1)  # type: ignore[arg-type]  # label only


def test_every_listed_route_is_served():
    ops = set(OpsRoutes(HealthState([]), Metrics(), []).routes) | {TOOLS_PATH, PLUGINS_PATH}
    openai = _openai()
    for route in HTTP_ROUTES:
        path = route.path("m")
        if route.template in ops:
            assert route.methods == ("GET", "HEAD")
        elif path.startswith("/v2/repository/"):
            assert ModelAdmin.label(path) is not None, path
            assert route.methods == ("POST",)
        elif path.startswith("/v2"):
            served = match_route(path)
            assert served is not None and served.kind is not RouteKind.UNKNOWN, path
            assert served.methods == route.methods, path
        else:
            assert openai.label(path) is not None, path


def test_every_served_fixed_route_is_listed():
    listed = {route.template for route in HTTP_ROUTES}
    ops = set(OpsRoutes(HealthState([]), Metrics(), []).routes) | {TOOLS_PATH, PLUGINS_PATH}
    assert ops <= listed
    assert {path.rstrip("/") for path in _FIXED} <= listed
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions"} <= listed


def test_open_routes_are_the_gateways_open_paths():
    assert {r.template for r in HTTP_ROUTES if r.open} == OPEN_PATHS | KSERVE_OPEN_PATHS
