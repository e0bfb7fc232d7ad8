"""Which wire protocol a request speaks, and how each one reports an error.

The only place that maps :class:`agentd.errors.Code` to HTTP and gRPC statuses.
"""

from __future__ import annotations

import enum
from typing import Any
from urllib.parse import quote

import orjson

from agentd.errors import Code
from agentd.gateway.asgi import Scope

__all__ = [
    "Protocol",
    "clip",
    "detect_protocol",
    "header",
    "http_status",
    "lower_content_type",
    "send_body",
    "send_error",
    "send_json",
]

_HTTP_STATUS = {
    Code.CANCELLED: 499,
    Code.UNKNOWN: 500,
    Code.INVALID_ARGUMENT: 400,
    Code.DEADLINE_EXCEEDED: 504,
    Code.NOT_FOUND: 404,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.FAILED_PRECONDITION: 400,
    Code.UNIMPLEMENTED: 501,
    Code.INTERNAL: 500,
    Code.UNAVAILABLE: 503,
    Code.UNAUTHENTICATED: 401,
}


class Protocol(enum.StrEnum):
    GRPC = "grpc"
    GRPC_WEB = "grpc-web"
    CONNECT = "connect"
    HTTP = "http"


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of request header ``name`` (lower case), or None."""
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def clip(text: str, limit: int = 100) -> str:
    """``text`` cut to ``limit`` characters with an ellipsis, for echoing client values in
    error messages (a 1 MB value must not come back as a 1 MB error)."""
    return text if len(text) <= limit else text[:limit] + "\u2026"


def lower_content_type(scope: Scope) -> None:
    """Lower-case the request's Content-Type in place: media types are case-insensitive
    (RFC 9110), and connect-python compares them byte for byte."""
    headers = scope["headers"]
    for index, (key, value) in enumerate(headers):
        if key == b"content-type":
            lowered = value.lower()
            if lowered != value:
                headers = list(headers)
                headers[index] = (key, lowered)
                scope["headers"] = headers
            return


def detect_protocol(scope: Scope, *, rpc_path: bool) -> Protocol:
    """gRPC and gRPC-Web by content type; other requests to RPC paths are Connect."""
    content_type = (header(scope, b"content-type") or b"").lower()
    if content_type.startswith(b"application/grpc-web"):
        return Protocol.GRPC_WEB
    if content_type.startswith(b"application/grpc"):
        return Protocol.GRPC
    return Protocol.CONNECT if rpc_path else Protocol.HTTP


def http_status(code: Code) -> int:
    return _HTTP_STATUS.get(code, 500)


def connect_code(code: Code) -> str:
    return "canceled" if code is Code.CANCELLED else code.name.lower()


async def send_error(
    send: Any,
    protocol: Protocol,
    code: Code,
    message: str,
    *,
    status: int | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Answer a request that never reached a handler with an error in its own protocol.

    gRPC and gRPC-Web get a trailers-only response (HTTP 200, grpc-status in the headers);
    Connect and plain HTTP get a JSON body ``{"code", "message"}`` with an HTTP status
    (``status`` overrides the default mapping, e.g. 413 for an oversized body). ``headers``
    are added to the answer (``Allow`` on a 405, ``grpc-accept-encoding`` beside an
    UNIMPLEMENTED encoding, for example).
    """
    if protocol in (Protocol.GRPC, Protocol.GRPC_WEB):
        content_type = b"application/grpc" if protocol is Protocol.GRPC else b"application/grpc-web"
        trailers = [
            (b"content-type", content_type),
            (b"grpc-status", str(code.value).encode()),
            (b"grpc-message", quote(message, safe=" ").encode()),
            *(headers or ()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": trailers})
        await send({"type": "http.response.body", "body": b""})
        return
    extra = list(headers or ())
    if code is Code.UNAUTHENTICATED:
        extra.append((b"www-authenticate", b'Bearer realm="agentd"'))
    await send_json(
        send, status or http_status(code), {"code": connect_code(code), "message": message}, extra
    )


async def send_body(
    send: Any,
    status: int,
    body: bytes,
    content_type: bytes = b"application/json",
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """A whole HTTP response in one body message, with its length."""
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if extra_headers:
        headers += extra_headers
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_json(
    send: Any, status: int, data: Any, extra_headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """``data`` as a JSON response (orjson)."""
    await send_body(send, status, orjson.dumps(data), extra_headers=extra_headers)
