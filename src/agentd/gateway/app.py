"""The gateway's ASGI app: one port, routed by path, guarded, observed.

A request's path is matched once (:class:`~agentd.gateway.router.Router`); the route and
the protocol go into the scope, then the request passes through middleware, each an app
wrapping the next: :class:`~agentd.gateway.observe.Observe` (metrics, span, status),
:class:`~agentd.gateway.admission.Auth` (when tokens are configured), and the route's own
app (with :class:`~agentd.gateway.admission.BodyLimit` for routes that take a body).
"""

from __future__ import annotations

import logging
from typing import Any

from agentd.agents import AgentRegistry
from agentd.gateway.admission import Auth, BodyLimit, SizeLimit, TokenCheck
from agentd.gateway.agent_service import AgentServiceImpl
from agentd.gateway.asgi import PROTOCOL, ROUTE, ASGIApp, Receive, Scope, Send
from agentd.gateway.connect_json import ConnectJsonInvoke
from agentd.gateway.endpoints import (
    GetOnly,
    KServeEndpoint,
    ModelAdminEndpoint,
    RefuseEncoding,
    RpcMethod,
    no_route_app,
    unknown_method,
    unknown_path,
)
from agentd.gateway.health import SERVICE as HEALTH_SERVICE
from agentd.gateway.health import HealthState, Phase, health_app
from agentd.gateway.kserve import OPEN_PATHS as KSERVE_OPEN_PATHS
from agentd.gateway.kserve import KServeRest, kserve_grpc_app
from agentd.gateway.model_admin import ModelAdmin
from agentd.gateway.observe import Observe
from agentd.gateway.openai import OpenAIRoutes
from agentd.gateway.ops import OPEN_PATHS, OpsRoutes
from agentd.gateway.plugins_api import PLUGINS_PATH, PluginsApi
from agentd.gateway.protocol import detect_protocol, lower_content_type
from agentd.gateway.reflection import REFLECTION_SERVICES, ReflectionService, reflection_apps
from agentd.gateway.router import Route, Router, by_label
from agentd.gateway.rpc_errors import compressions, install_strict_codecs
from agentd.gateway.tools_api import TOOLS_PATH, ToolsApi
from agentd.node import Node
from agentd.plugins.settings_reload import SettingsReload
from agentd.settings import Settings
from agentd.v1 import agent_pb2
from agentd.v1.agent_connect import AgentServiceASGIApplication

__all__ = ["Gateway"]

log = logging.getLogger(__name__)

AGENT_SERVICE = "agentd.v1.AgentService"
INVOKE_PATH = f"/{AGENT_SERVICE}/Invoke"
KSERVE_SERVICE = "inference.GRPCInferenceService"


class Gateway:
    """Serves one node as ASGI: every protocol on one port, routed by path, guarded and
    observed. Its ASGI lifespan starts the node (unless started already) and closes what
    it started."""

    def __init__(self, node: Node) -> None:
        self.node = node
        if node.metrics is None or node.generation is None or node.tools is None:
            # Its routes need them all (NodeOptions left one out).
            raise ValueError("a gateway serves a node with metrics, language models and tools")
        settings = self.settings = node.settings
        self.metrics = node.metrics
        self.tracing = node.tracing
        self.runtime = node.runtime
        self.inference = node.inference
        self.generation = node.generation
        self.tools = node.tools
        self._owns_start = False
        install_strict_codecs()
        limit = settings.max_body_bytes
        self._body_limit = SizeLimit(limit)  # the routes' own check, changed by a reload
        agent_service = AgentServiceImpl(self.runtime, tools=self.tools)
        agent_app = AgentServiceASGIApplication(
            agent_service, read_max_bytes=limit, compressions=compressions(limit)
        )
        reflection = reflection_apps(
            ReflectionService([AGENT_SERVICE, HEALTH_SERVICE, KSERVE_SERVICE, *REFLECTION_SERVICES])
        )
        # The node's one readiness: /readyz, gRPC health and KServe's ready all ask it.
        self.health = HealthState([AGENT_SERVICE, KSERVE_SERVICE])
        self.health.add_check(self.runtime.not_ready_reason)
        kserve_app = kserve_grpc_app(self.inference, limit, ready=self.health.ready)
        rpc_apps: list[Any] = [agent_app, health_app(self.health), *reflection, kserve_app]
        ops = OpsRoutes(
            self.health,
            self.metrics,
            sorted(a.path[1:] for a in rpc_apps),
            plugin_failures=node.plugins.failures if node.plugins is not None else None,
            plugin_folder=node.plugins.folder if node.plugins is not None else None,
        )
        ops.routes[TOOLS_PATH] = ToolsApi(self.tools).list
        self.plugins_api = PluginsApi(node)
        ops.routes[PLUGINS_PATH] = self.plugins_api.list
        self.router = _build_router(
            rpc_apps,
            ops,
            ConnectJsonInvoke(self.runtime),
            KServeRest(self.inference, max_body_bytes=limit, ready=self.health.ready),
            ModelAdmin(self.inference, self.generation),
            OpenAIRoutes(
                self.generation,
                max_body_bytes=limit,
                embeddings=self.inference.embeddings if self.inference is not None else None,
            ),
            self._body_limit,
        )
        self._app: ASGIApp = self._guarded(settings)
        # A settings reload (docs/configuration.md) swaps the chain in one assignment: auth
        # off costs nothing per request, as without reload.
        reload = node.plugins.handlers.get("settings") if node.plugins is not None else None
        if isinstance(reload, SettingsReload):
            reload.subscribe(self._settings_changed)

    def _guarded(self, settings: Settings) -> ASGIApp:
        app: ASGIApp = _dispatch
        tokens = TokenCheck(settings.auth_tokens)
        if tokens.enabled:
            app = Auth(app, tokens)
        return Observe(app, self.metrics, self.tracing)

    def _settings_changed(self, settings: Settings) -> None:
        self._body_limit.bytes = settings.max_body_bytes
        self._app = self._guarded(settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            route = self.router.match(scope["path"])
            if route.rpc:
                lower_content_type(scope)
            scope[ROUTE] = route
            scope[PROTOCOL] = detect_protocol(scope, rpc_path=route.rpc)
            await self._app(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if not self.node.started:
                    try:
                        await self.node.start()
                    except Exception as exc:
                        # What had started is closed again (Node.start). The server reports
                        # the message and exits (pyvoy: "Application startup failed: ..."),
                        # where a raised error would read as an app without lifespan.
                        log.exception("the node failed to start")
                        self.health.set_phase(Phase.STOPPED)
                        await send({"type": "lifespan.startup.failed", "message": _why(exc)})
                        return
                    self._owns_start = True
                    self.plugins_api.write_summary()  # agentd serve prints it (one line)
                if self.health.phase is Phase.STARTING:  # a drain may have begun meanwhile
                    self.health.set_phase(Phase.SERVING)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def start_draining(self) -> None:
        """The server has begun to drain (``agentd serve`` got SIGTERM or Ctrl-C): from now
        on the node says it is not ready, on every readiness surface, while the calls in
        flight finish. Idempotent."""
        if self.health.phase in (Phase.STARTING, Phase.SERVING):
            log.info("draining: not ready, finishing in-flight calls")
            self.health.set_phase(Phase.DRAINING)

    @classmethod
    def from_settings(cls, settings: Settings, *, registry: AgentRegistry | None = None) -> Gateway:
        """A gateway over a new node of ``settings`` (started by the ASGI lifespan)."""
        return cls(Node(settings, registry=registry))

    async def aclose(self) -> None:
        """Not ready from now on; closes the node if this gateway started it."""
        self.health.set_phase(Phase.STOPPED)
        if self._owns_start:
            self._owns_start = False
            await self.node.aclose()
        log.info("gateway stopped")


def _why(exc: BaseException) -> str:
    """One line naming a start-up error: its type and message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


async def _dispatch(scope: Scope, receive: Receive, send: Send) -> None:
    await scope[ROUTE].app(scope, receive, send)


def _build_router(
    rpc_apps: list[Any],
    ops: OpsRoutes,
    json_invoke: ConnectJsonInvoke,
    kserve: KServeRest,
    admin: ModelAdmin,
    openai: OpenAIRoutes,
    limit: SizeLimit,
) -> Router:
    """Every route of the gateway, each with its label and its own middleware."""
    router = Router(Route("other", unknown_path))
    # RPC methods: "/pkg.Service/Method"; unknown methods of a known service are labelled
    # "other" (bounded labels).
    agent_methods = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].methods
    agent_streaming = {f"/{AGENT_SERVICE}/{m.name}" for m in agent_methods if m.client_streaming}
    for app in rpc_apps:
        if app is rpc_apps[0]:
            paths: list[str] = [f"/{AGENT_SERVICE}/{m.name}" for m in agent_methods]
            streaming: set[str] | frozenset[str] = agent_streaming
        else:
            paths, streaming = list(app.method_paths), app.streaming_requests
        health = app.path == f"/{HEALTH_SERVICE}"
        for path in paths:
            endpoint = RpcMethod(
                app,
                limit=limit,
                streaming_requests=path in streaming,
                json_invoke=json_invoke if path == INVOKE_PATH else None,
            )
            handler = RefuseEncoding(BodyLimit(endpoint, limit, stream_grpc=True))
            # Health probes come from load balancers and kubelets without credentials.
            router.add(path, Route(path, handler, open=health, rpc=True))
        router.add_service(app.path, Route("other", unknown_method, open=False, rpc=True))
    for path, op in ops.routes.items():
        router.add(path, Route(path, GetOnly(op), open=path in OPEN_PATHS))
    router.add_prefix("/v1/", by_label(openai.label, lambda label: Route(label, openai.handle)))
    admin_app = BodyLimit(ModelAdminEndpoint(admin), limit)
    router.add_prefix(
        "/v2/repository/", by_label(admin.label, lambda label: Route(label, admin_app))
    )
    kserve_app = BodyLimit(KServeEndpoint(kserve), limit)
    kserve_match = by_label(
        kserve.route_label,
        lambda label: Route(label, kserve_app, open=label in KSERVE_OPEN_PATHS),
    )
    no_route = Route("other", BodyLimit(no_route_app, limit))
    router.add_prefix("/v2", lambda path: kserve_match(path) or no_route)
    return router
