"""The gateway's ASGI app: one port, routed by path, guarded, observed."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.trace import SpanKind

from agentd.agents import AgentRegistry
from agentd.errors import Code
from agentd.gateway.admission import (
    BodyTooLarge,
    TokenCheck,
    buffer_body,
    counting_receive,
    framed_receive,
    replay,
)
from agentd.gateway.agent_service import AgentServiceImpl
from agentd.gateway.connect_json import ConnectJsonInvoke
from agentd.gateway.health import SERVICE as HEALTH_SERVICE
from agentd.gateway.health import HealthState, Phase, health_app
from agentd.gateway.kserve import OPEN_PATHS as KSERVE_OPEN_PATHS
from agentd.gateway.kserve import KServeRest, kserve_grpc_app
from agentd.gateway.model_admin import ModelAdmin
from agentd.gateway.observe import StatusRecorder
from agentd.gateway.openai import OpenAIRoutes
from agentd.gateway.ops import OPEN_PATHS, OpsRoutes
from agentd.gateway.protocol import (
    Protocol,
    clip,
    detect_protocol,
    header,
    lower_content_type,
    send_error,
)
from agentd.gateway.reflection import REFLECTION_SERVICES, ReflectionService, reflection_apps
from agentd.gateway.rpc_errors import (
    check_grpc_headers,
    compressions,
    declares_encoding,
    install_strict_codecs,
    refused_encoding,
)
from agentd.gateway.tools_api import TOOLS_PATH, ToolsApi
from agentd.node import Node
from agentd.settings import Settings
from agentd.v1 import agent_pb2
from agentd.v1.agent_connect import AgentServiceASGIApplication

__all__ = ["Gateway"]

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

AGENT_SERVICE = "agentd.v1.AgentService"
INVOKE_PATH = f"/{AGENT_SERVICE}/Invoke"
KSERVE_SERVICE = "inference.GRPCInferenceService"


class Gateway:
    """Serves one node as ASGI: every protocol on one port, routed by path, guarded and
    observed. Its ASGI lifespan starts the node (unless started already) and closes what
    it started."""

    def __init__(self, node: Node) -> None:
        self.node = node
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
        agent_service = AgentServiceImpl(self.runtime, tools=self.tools)
        agent_app = AgentServiceASGIApplication(
            agent_service, read_max_bytes=limit, compressions=compressions(limit)
        )
        self._json_invoke = ConnectJsonInvoke(self.runtime)
        reflection = reflection_apps(
            ReflectionService([AGENT_SERVICE, HEALTH_SERVICE, KSERVE_SERVICE, *REFLECTION_SERVICES])
        )
        # The node's one readiness: /readyz, gRPC health and KServe's ready all ask it.
        self.health = HealthState([AGENT_SERVICE, KSERVE_SERVICE])
        self.health.add_check(self.runtime.not_ready_reason)
        kserve_app = kserve_grpc_app(self.inference, limit, ready=self.health.ready)
        self._kserve = KServeRest(self.inference, max_body_bytes=limit, ready=self.health.ready)
        self._model_admin = ModelAdmin(self.inference)
        self._openai = OpenAIRoutes(self.generation, max_body_bytes=limit)
        rpc_apps: list[Any] = [agent_app, health_app(self.health), *reflection, kserve_app]
        # "/pkg.Service" -> app; RPC paths are "/pkg.Service/Method".
        self._rpc_apps: dict[str, ASGIApp] = {app.path: app for app in rpc_apps}
        # Known method paths label the metrics; anything else is "other" (bounded labels).
        agent_methods = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].methods
        self._rpc_methods = frozenset(
            [f"/{AGENT_SERVICE}/{m.name}" for m in agent_methods]
            + [path for app in rpc_apps[1:] for path in app.method_paths]
        )
        # Methods that take a stream of requests; every other one takes exactly one message.
        self._streaming_requests = frozenset(
            [f"/{AGENT_SERVICE}/{m.name}" for m in agent_methods if m.client_streaming]
            + [path for app in rpc_apps[1:] for path in app.streaming_requests]
        )
        self._ops = OpsRoutes(self.health, self.metrics, sorted(a.path[1:] for a in rpc_apps))
        self._ops.routes[TOOLS_PATH] = ToolsApi(self.tools).list
        self._tokens = TokenCheck(settings.auth_tokens)
        self._open_paths = (
            OPEN_PATHS
            | KSERVE_OPEN_PATHS
            | {p for p in self._rpc_methods if p.startswith(f"/{HEALTH_SERVICE}/")}
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        slash = path.find("/", 1)
        rpc_app = self._rpc_apps.get(path[:slash]) if slash > 0 else None
        if rpc_app is not None:
            lower_content_type(scope)
        protocol = detect_protocol(scope, rpc_path=rpc_app is not None)
        if rpc_app is not None:
            label = path if path in self._rpc_methods else "other"
        else:
            label = (
                self._model_admin.label(path)
                or self._kserve.route_label(path)
                or self._openai.label(path)
                or (path if path in self._ops.routes else "other")
            )

        metrics = self.metrics
        metrics.request_started(protocol)
        recorder = StatusRecorder(send, grpc_web=protocol is Protocol.GRPC_WEB)
        started = time.perf_counter()
        token = None
        parent = self.tracing.extract(scope["headers"]) if _has_trace(scope) else None
        if parent is not None:
            token = otel_context.attach(parent)
        try:
            if self.tracing.enabled:
                with self.tracing.tracer.start_as_current_span(
                    label, kind=SpanKind.SERVER, attributes={"rpc.system": str(protocol)}
                ) as span:
                    await self._route(scope, receive, recorder, rpc_app, protocol, path)
                    code, _ = recorder.outcome()
                    span.set_attribute("agentd.status", code)
            else:
                await self._route(scope, receive, recorder, rpc_app, protocol, path)
        finally:
            if token is not None:
                otel_context.detach(token)
            code, error = recorder.outcome()
            metrics.request_finished(
                protocol, label, code, time.perf_counter() - started, error=error
            )

    async def _route(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        rpc_app: ASGIApp | None,
        protocol: Protocol,
        path: str,
    ) -> None:
        if path not in self._open_paths and not self._tokens.allows(
            header(scope, b"authorization")
        ):
            await send_error(
                send, protocol, Code.UNAUTHENTICATED, "missing or invalid bearer token"
            )
            return
        if rpc_app is None and self._openai.label(path) is not None:
            await self._openai.handle(scope, receive, send)
            return
        rest_api = rpc_app is None and path.startswith("/v2")
        if rpc_app is None and not rest_api:
            await self._serve_ops(scope, send, protocol, path)
            return
        if rpc_app is not None and path not in self._rpc_methods:
            # A known service without this method: UNIMPLEMENTED in the caller's protocol
            # (a bare 404 reads as a transport failure to gRPC clients).
            await send_error(
                send, protocol, Code.UNIMPLEMENTED, f"unknown method {clip(path)}", status=404
            )
            return
        if rpc_app is not None and (refused := refused_encoding(scope, protocol)) is not None:
            message, accepted = refused
            await send_error(send, protocol, Code.UNIMPLEMENTED, message, headers=accepted)
            return
        limit = self.settings.max_body_bytes
        length = header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _too_large(send, protocol, limit)
            return
        if rpc_app is not None and protocol in (Protocol.GRPC, Protocol.GRPC_WEB):
            problem = check_grpc_headers(scope, protocol)
            if problem is not None:
                await send_error(send, protocol, Code.INVALID_ARGUMENT, problem)
                return
            if _enveloped(header(scope, b"content-type")):
                unary = path not in self._streaming_requests
                encoded = declares_encoding(scope, protocol)
                framed = framed_receive(receive, limit, unary=unary, encoded=encoded)
                await rpc_app(scope, framed, send)
            else:
                await rpc_app(scope, counting_receive(receive, limit), send)
            return
        try:
            body, disconnected = await buffer_body(receive, limit)
        except BodyTooLarge:
            await _too_large(send, protocol, limit)
            return
        if disconnected:
            return
        if rest_api:
            if self._model_admin.label(path) is not None:
                await self._model_admin.handle(scope, send)
            elif not await self._kserve.handle(scope, body, send):
                await send_error(send, protocol, Code.NOT_FOUND, f"no route for {clip(path)}")
            return
        assert rpc_app is not None
        if path == INVOKE_PATH and self._json_invoke.accepts(scope):
            await self._json_invoke(scope, body, send)
            return
        body_receive = replay(body, receive)
        if (header(scope, b"content-type") or b"").startswith(b"application/connect+"):
            # Connect streaming: the body is enveloped like gRPC's; check its framing too.
            unary = path not in self._streaming_requests
            encoded = declares_encoding(scope, protocol)
            body_receive = framed_receive(body_receive, limit, unary=unary, encoded=encoded)
        await rpc_app(scope, body_receive, send)

    async def _serve_ops(self, scope: Scope, send: Send, protocol: Protocol, path: str) -> None:
        handler = self._ops.routes.get(path)
        if handler is None:
            if protocol in (Protocol.GRPC, Protocol.GRPC_WEB):
                await send_error(send, protocol, Code.UNIMPLEMENTED, f"unknown method {clip(path)}")
            else:
                await send_error(send, protocol, Code.NOT_FOUND, f"no route for {clip(path)}")
            return
        if scope["method"] not in ("GET", "HEAD"):
            await send_error(
                send,
                protocol,
                Code.INVALID_ARGUMENT,
                "use GET",
                status=405,
                headers=[(b"allow", b"GET, HEAD")],
            )
            return
        await handler(send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if not self.node.started:
                    await self.node.start()
                    self._owns_start = True
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


def _enveloped(content_type: bytes | None) -> bool:
    """Whether connect-python reads this body as gRPC or gRPC-Web envelopes (not, for
    example, base64 ``application/grpc-web-text``, which it refuses with 415)."""
    if content_type is None:
        return False
    return content_type in (b"application/grpc", b"application/grpc-web") or (
        content_type.startswith((b"application/grpc+", b"application/grpc-web+"))
    )


def _has_trace(scope: Scope) -> bool:
    return any(name == b"traceparent" for name, _ in scope["headers"])


async def _too_large(send: Send, protocol: Protocol, limit: int) -> None:
    await send_error(
        send,
        protocol,
        Code.RESOURCE_EXHAUSTED,
        f"request body is larger than the limit of {limit} bytes",
        status=413,
    )
