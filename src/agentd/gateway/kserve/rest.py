"""KServe v2 REST: health, metadata and inference under ``/v2``, over the inference service.

An ASGI-level adapter: the gateway has already authenticated the request, buffered the body
within its limit and started the metrics; this module routes ``/v2`` paths, converts JSON
and binary bodies with the codecs and maps errors to the KServe REST error shape
``{"error": "message"}``.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from agentd.errors import AgentdError, Code, InvalidArgument
from agentd.gateway.admission import InflatedTooLarge, inflate
from agentd.gateway.asgi import Scope, Send
from agentd.gateway.kserve.rest_codec import decode_request, encode_response
from agentd.gateway.protocol import clip, header, http_status
from agentd.gateway.redact import public_message
from agentd.inference.types import InferenceRequest, ModelMetadata, TensorSpec

if TYPE_CHECKING:
    from agentd.inference.service import InferenceService

__all__ = ["OPEN_PATHS", "KServeRest", "Route", "RouteKind", "match_route"]

log = logging.getLogger(__name__)


# Liveness and readiness probes come from kubelets and load balancers without credentials.
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})

_JSON = b"application/json"
_OCTETS = b"application/octet-stream"
_HEADER_LENGTH = b"inference-header-content-length"


class RouteKind(enum.Enum):
    SERVER_METADATA = "server_metadata"
    LIVE = "live"
    READY = "ready"
    MODEL_METADATA = "model_metadata"
    MODEL_READY = "model_ready"
    INFER = "infer"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Route:
    kind: RouteKind
    label: str  # the metrics label: a template, never a model name
    model: str | None = None
    version: str | None = None

    @property
    def methods(self) -> tuple[str, ...]:
        return ("POST",) if self.kind is RouteKind.INFER else ("GET", "HEAD")


_FIXED = {
    "/v2": Route(RouteKind.SERVER_METADATA, "/v2"),
    "/v2/": Route(RouteKind.SERVER_METADATA, "/v2"),
    "/v2/health/live": Route(RouteKind.LIVE, "/v2/health/live"),
    "/v2/health/ready": Route(RouteKind.READY, "/v2/health/ready"),
}
_MODEL_ACTIONS = {"ready": RouteKind.MODEL_READY, "infer": RouteKind.INFER}


def match_route(path: str) -> Route | None:
    """The route for ``path``; None when it is not under ``/v2`` at all."""
    fixed = _FIXED.get(path)
    if fixed is not None:
        return fixed
    if not path.startswith("/v2/"):
        return None
    parts = path[4:].split("/")
    if len(parts) < 2 or parts[0] != "models" or not parts[1]:
        return Route(RouteKind.UNKNOWN, "other")
    model, rest = parts[1], parts[2:]
    label = "/v2/models/{name}"
    version = None
    if len(rest) >= 2 and rest[0] == "versions" and rest[1]:
        version, rest = rest[1], rest[2:]
        label += "/versions/{version}"
    if not rest:
        return Route(RouteKind.MODEL_METADATA, label, model, version)
    if len(rest) == 1 and rest[0] in _MODEL_ACTIONS:
        return Route(_MODEL_ACTIONS[rest[0]], f"{label}/{rest[0]}", model, version)
    return Route(RouteKind.UNKNOWN, "other")


class KServeRest:
    """Serves the KServe v2 REST routes from one :class:`InferenceService`.

    ``max_body_bytes`` bounds a request body after decompression (gzip or deflate), as the
    gateway bounds it on the wire. A request's ``timeout`` parameter is passed to the
    service, which resolves the call's deadline (the node's rule, as over gRPC).
    ``ready`` answers ``/v2/health/ready``: the node's readiness in a gateway (default:
    the inference service's own).
    """

    def __init__(
        self,
        service: InferenceService,
        *,
        max_body_bytes: int,
        ready: Callable[[], bool] | None = None,
    ) -> None:
        self._service = service
        self._max_body_bytes = max_body_bytes
        self._ready = ready or service.ready

    @staticmethod
    def route_label(path: str) -> str | None:
        """The metrics label for ``path``, or None when ``path`` is not a KServe route."""
        route = match_route(path)
        return None if route is None else route.label

    async def handle(self, scope: Scope, body: bytes, send: Send) -> bool:
        """Answer the request; False (nothing sent) when ``path`` is not under ``/v2``."""
        route = match_route(scope["path"])
        if route is None:
            return False
        head_only = scope["method"] == "HEAD"
        if route.kind is RouteKind.UNKNOWN:
            await _error(send, Code.NOT_FOUND, f"no KServe route for {clip(scope['path'])}")
            return True
        if scope["method"] not in route.methods:
            allow = ", ".join(route.methods).encode()
            await _error(
                send,
                Code.INVALID_ARGUMENT,
                f"{scope['method']} is not allowed on {route.label}; use {allow.decode()}",
                status=405,
                extra=[(b"allow", allow)],
            )
            return True
        try:
            if route.kind is RouteKind.INFER:
                await self._infer(scope, body, send, route)
            else:
                await self._get(send, route, head_only)
        except InflatedTooLarge as exc:
            await _error(send, exc.code, exc.message, status=413)
        except AgentdError as exc:
            await _error(send, exc.code, public_message(exc.message))
        except Exception:
            # A bug, not the client's fault: log it, answer 500, keep serving.
            log.exception("KServe REST %s failed", route.label)
            await _error(send, Code.INTERNAL, "internal error")
        return True

    async def _get(self, send: Send, route: Route, head_only: bool) -> None:
        service = self._service
        kind = route.kind
        if kind is RouteKind.LIVE:
            await _status(send, service.live(), "server is not live", head_only)
        elif kind is RouteKind.READY:
            await _status(send, self._ready(), "server is not ready", head_only)
        elif kind is RouteKind.SERVER_METADATA:
            await _json(send, 200, orjson.dumps(service.server_metadata()), head_only)
        elif kind is RouteKind.MODEL_METADATA:
            assert route.model is not None
            metadata = service.metadata(route.model, route.version)
            await _json(send, 200, orjson.dumps(_metadata_doc(metadata)), head_only)
        elif kind is RouteKind.MODEL_READY:
            assert route.model is not None
            ready = service.is_ready(route.model, route.version)
            await _status(send, ready, f"model {route.model!r} is not ready", head_only)

    async def _infer(self, scope: Scope, body: bytes, send: Send, route: Route) -> None:
        assert route.model is not None
        # Unknown model first: a 404 tells more than complaints about the body.
        self._service.metadata(route.model, route.version)
        body = self._decompress(scope, body)
        request = decode_request(body, _header_length(scope))
        response = await self._service.infer_request(
            InferenceRequest(
                route.model,
                request.inputs,
                version=route.version,
                outputs=request.output_names,
                timeout=request.timeout_s,
            )
        )
        payload, json_length = encode_response(
            response.model, response.version, request, response.outputs
        )
        if json_length is None:
            await _json(send, 200, payload)
            return
        headers = [
            (b"content-type", _OCTETS),
            (b"content-length", str(len(payload)).encode()),
            (_HEADER_LENGTH, str(json_length).encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    def _decompress(self, scope: Scope, body: bytes) -> bytes:
        return inflate(body, header(scope, b"content-encoding"), self._max_body_bytes)


def _metadata_doc(metadata: ModelMetadata) -> dict[str, Any]:
    """The KServe model metadata object (shapes include -1 for a batch dimension)."""
    return {
        "name": metadata.name,
        "versions": [metadata.version],
        "platform": metadata.platform,
        "inputs": [_tensor_doc(t) for t in metadata.inputs],
        "outputs": [_tensor_doc(t) for t in metadata.outputs],
        # Beyond the spec (clients ignore unknown keys): where and how the model runs.
        "parameters": {
            "max_batch_size": metadata.max_batch_size,
            "execution_providers": list(metadata.execution_providers),
        },
    }


def _tensor_doc(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype.value, "shape": list(spec.shape)}


def _header_length(scope: Scope) -> int | None:
    raw = header(scope, _HEADER_LENGTH)
    if raw is None:
        return None
    raw = raw.strip()
    if not raw.isdigit() or len(raw) > 18:
        raise InvalidArgument(
            f"malformed Inference-Header-Content-Length {clip(raw.decode('latin-1'))!r}"
        )
    return int(raw)


async def _status(send: Send, ok: bool, reason: str, head_only: bool) -> None:
    # The KServe spec: 200 means true, a 4xx means false; bodies stay empty on success.
    if ok:
        await _json(send, 200, b"", head_only)
    else:
        await _json(send, 400, orjson.dumps({"error": reason}), head_only)


async def _json(send: Send, status: int, body: bytes, head_only: bool = False) -> None:
    headers = [(b"content-length", str(len(body)).encode())]
    if body:
        headers.append((b"content-type", _JSON))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head_only else body})


async def _error(
    send: Send,
    code: Code,
    message: str,
    *,
    status: int | None = None,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = orjson.dumps({"error": message})
    headers = [(b"content-type", _JSON), (b"content-length", str(len(body)).encode())]
    if extra:
        headers.extend(extra)
    await send(
        {"type": "http.response.start", "status": status or http_status(code), "headers": headers}
    )
    await send({"type": "http.response.body", "body": body})
