"""The gateway's endpoints: the apps at the end of a route, after its middleware.

Each is an ASGI app reading the protocol the gateway put in the scope
(:data:`agentd.gateway.asgi.PROTOCOL`); bodies a route reads whole come replayed by
:class:`~agentd.gateway.admission.BodyLimit` as one ``http.request`` message.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from agentd.errors import Code
from agentd.gateway.admission import SizeLimit, counting_receive, framed_receive
from agentd.gateway.asgi import PROTOCOL, ASGIApp, Receive, Scope, Send
from agentd.gateway.connect_json import ConnectJsonInvoke
from agentd.gateway.kserve import KServeRest
from agentd.gateway.model_admin import ModelAdmin
from agentd.gateway.protocol import Protocol, clip, header, send_error
from agentd.gateway.rpc_errors import check_grpc_headers, declares_encoding, refused_encoding

__all__ = [
    "GetOnly",
    "KServeEndpoint",
    "ModelAdminEndpoint",
    "RefuseEncoding",
    "RpcMethod",
    "no_route_app",
    "unknown_method",
    "unknown_path",
]

_GRPC = (Protocol.GRPC, Protocol.GRPC_WEB)


class RpcMethod:
    """One method of an RPC service (a connect-python app), in any of its protocols.

    gRPC and gRPC-Web: the headers are checked, and the body streams on through a receive
    that counts it and checks its framing. Connect: the body comes whole; a unary JSON
    ``Invoke`` takes the fast path (``json_invoke``), and a streaming body's framing is
    checked like gRPC's.
    """

    __slots__ = ("_app", "_json_invoke", "_limit", "_unary")

    def __init__(
        self,
        app: ASGIApp,
        *,
        limit: int | SizeLimit,
        streaming_requests: bool,
        json_invoke: ConnectJsonInvoke | None = None,
    ) -> None:
        self._app = app
        self._limit = limit if isinstance(limit, SizeLimit) else SizeLimit(limit)
        self._unary = not streaming_requests
        self._json_invoke = json_invoke

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        protocol = scope[PROTOCOL]
        if protocol in _GRPC:
            problem = check_grpc_headers(scope, protocol)
            if problem is not None:
                await send_error(send, protocol, Code.INVALID_ARGUMENT, problem)
                return
            if _enveloped(header(scope, b"content-type")):
                encoded = declares_encoding(scope, protocol)
                receive = framed_receive(
                    receive, self._limit.bytes, unary=self._unary, encoded=encoded
                )
            else:
                receive = counting_receive(receive, self._limit.bytes)
            await self._app(scope, receive, send)
            return
        if self._json_invoke is not None and self._json_invoke.accepts(scope):
            await self._json_invoke(scope, (await receive())["body"], send)
            return
        if (header(scope, b"content-type") or b"").startswith(b"application/connect+"):
            # Connect streaming: the body is enveloped like gRPC's; check its framing too.
            encoded = declares_encoding(scope, protocol)
            receive = framed_receive(receive, self._limit.bytes, unary=self._unary, encoded=encoded)
        await self._app(scope, receive, send)


class RefuseEncoding:
    """Middleware for RPC methods: a message encoding the server does not speak is
    UNIMPLEMENTED, with the encodings it accepts, before any of the body is read."""

    __slots__ = ("_app",)

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        protocol = scope[PROTOCOL]
        if (refused := refused_encoding(scope, protocol)) is not None:
            message, accepted = refused
            await send_error(send, protocol, Code.UNIMPLEMENTED, message, headers=accepted)
            return
        await self._app(scope, receive, send)


async def unknown_method(scope: Scope, receive: Receive, send: Send) -> None:
    """A known service without this method: UNIMPLEMENTED in the caller's protocol (a
    bare 404 reads as a transport failure to gRPC clients)."""
    await send_error(
        send,
        scope[PROTOCOL],
        Code.UNIMPLEMENTED,
        f"unknown method {clip(scope['path'])}",
        status=404,
    )


async def unknown_path(scope: Scope, receive: Receive, send: Send) -> None:
    """No route: 404 NOT_FOUND, or UNIMPLEMENTED for a gRPC client."""
    protocol = scope[PROTOCOL]
    if protocol in _GRPC:
        await send_error(
            send, protocol, Code.UNIMPLEMENTED, f"unknown method {clip(scope['path'])}"
        )
    else:
        await send_error(send, protocol, Code.NOT_FOUND, f"no route for {clip(scope['path'])}")


async def no_route_app(scope: Scope, receive: Receive, send: Send) -> None:
    """No route under ``/v2``: NOT_FOUND in every protocol."""
    await send_error(send, scope[PROTOCOL], Code.NOT_FOUND, f"no route for {clip(scope['path'])}")


class GetOnly:
    """An operational route: GET (and HEAD, which arrives as GET) only, else 405. The
    handler gets ``send`` and the request's scope (e.g. for its Accept header)."""

    __slots__ = ("_handler",)

    def __init__(self, handler: Callable[[Send, Scope], Awaitable[None]]) -> None:
        self._handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            await send_error(
                send,
                scope[PROTOCOL],
                Code.INVALID_ARGUMENT,
                "use GET",
                status=405,
                headers=[(b"allow", b"GET, HEAD")],
            )
            return
        await self._handler(send, scope)


class KServeEndpoint:
    """KServe v2 REST (the body comes whole)."""

    __slots__ = ("_rest",)

    def __init__(self, rest: KServeRest) -> None:
        self._rest = rest

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not await self._rest.handle(scope, (await receive())["body"], send):
            await no_route_app(scope, receive, send)


class ModelAdminEndpoint:
    """The KServe model repository extension (its body, read whole, is not used)."""

    __slots__ = ("_admin",)

    def __init__(self, admin: ModelAdmin) -> None:
        self._admin = admin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._admin.handle(scope, send)


def _enveloped(content_type: bytes | None) -> bool:
    """Whether connect-python reads this body as gRPC or gRPC-Web envelopes (not, for
    example, base64 ``application/grpc-web-text``, which it refuses with 415)."""
    if content_type is None:
        return False
    return content_type in (b"application/grpc", b"application/grpc-web") or (
        content_type.startswith((b"application/grpc+", b"application/grpc-web+"))
    )
