"""Admission checks before a request reaches a handler: bearer tokens, body size, content
encoding and, for enveloped (gRPC, gRPC-Web, Connect streaming) bodies, their framing.

:class:`Auth` and :class:`BodyLimit` are middleware: ASGI apps wrapping an app, reading the
route and protocol the gateway put in the scope (:mod:`agentd.gateway.asgi`)."""

from __future__ import annotations

import hmac
import zlib
from typing import Any

from connectrpc.code import Code as ConnectCode
from connectrpc.errors import ConnectError

from agentd.errors import Code, InvalidArgument, ResourceExhausted
from agentd.gateway.asgi import PROTOCOL, ROUTE, ASGIApp, Receive, Scope, Send
from agentd.gateway.protocol import Protocol, clip, header, send_error

__all__ = [
    "Auth",
    "BodyLimit",
    "BodyTooLarge",
    "InflatedTooLarge",
    "SizeLimit",
    "TokenCheck",
    "UnsupportedEncoding",
    "buffer_body",
    "counting_receive",
    "framed_receive",
    "inflate",
    "replay",
]


class TokenCheck:
    """Accepts ``Authorization: Bearer <token>`` for any configured token."""

    def __init__(self, tokens: list[str]) -> None:
        self._tokens = [t.encode() for t in tokens]

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def allows(self, authorization: bytes | None) -> bool:
        if not self._tokens:
            return True
        if authorization is None or authorization[:7].lower() != b"bearer ":
            return False
        presented = authorization[7:].strip()
        # Compare against every token so timing does not tell which one nearly matched.
        ok = False
        for token in self._tokens:
            ok |= hmac.compare_digest(presented, token)
        return ok


class Auth:
    """Middleware: a route that is not open needs a configured bearer token, else
    UNAUTHENTICATED in the caller's protocol."""

    __slots__ = ("_app", "_tokens")

    def __init__(self, app: ASGIApp, tokens: TokenCheck) -> None:
        self._app = app
        self._tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not scope[ROUTE].open and not self._tokens.allows(header(scope, b"authorization")):
            await send_error(
                send, scope[PROTOCOL], Code.UNAUTHENTICATED, "missing or invalid bearer token"
            )
            return
        await self._app(scope, receive, send)


class SizeLimit:
    """A body size limit shared by the gateway's routes, read per request: a settings
    reload changes ``bytes`` for them all at once."""

    __slots__ = ("bytes",)

    def __init__(self, limit: int) -> None:
        self.bytes = limit


class BodyLimit:
    """Middleware: a body past ``limit`` bytes is refused with 413 RESOURCE_EXHAUSTED.

    A declared ``Content-Length`` past the limit is refused before anything is read. Then
    the body is read whole and replayed to the app, and a client that left meanwhile gets
    nothing; except, with ``stream_grpc``, a gRPC or gRPC-Web body, which streams on to
    the app (that counts it as it reads, with :func:`framed_receive`).
    """

    __slots__ = ("_app", "_limit", "_stream_grpc")

    def __init__(self, app: ASGIApp, limit: int | SizeLimit, *, stream_grpc: bool = False) -> None:
        self._app = app
        self._limit = limit if isinstance(limit, SizeLimit) else SizeLimit(limit)
        self._stream_grpc = stream_grpc

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self._limit.bytes
        length = header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await too_large(send, scope[PROTOCOL], limit)
            return
        if self._stream_grpc and scope[PROTOCOL] in _GRPC:
            await self._app(scope, receive, send)
            return
        try:
            body, disconnected = await buffer_body(receive, limit)
        except BodyTooLarge:
            await too_large(send, scope[PROTOCOL], limit)
            return
        if disconnected:
            return
        await self._app(scope, replay(body, receive), send)


_GRPC = (Protocol.GRPC, Protocol.GRPC_WEB)


async def too_large(send: Send, protocol: Protocol, limit: int) -> None:
    """413 RESOURCE_EXHAUSTED in ``protocol``."""
    await send_error(
        send,
        protocol,
        Code.RESOURCE_EXHAUSTED,
        f"request body is larger than the limit of {limit} bytes",
        status=413,
    )


class BodyTooLarge(Exception):
    pass


async def buffer_body(receive: Receive, limit: int) -> tuple[bytes, bool]:
    """Read a whole request body up to ``limit`` bytes.

    Returns ``(body, disconnected)``; raises BodyTooLarge past the limit.
    """
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks), True
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks) if len(chunks) != 1 else chunks[0], False


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive callable that yields ``body`` once, then defers to ``receive``."""
    sent = False

    async def replay_receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay_receive


def counting_receive(receive: Receive, limit: int) -> Receive:
    """A receive callable for streamed (gRPC) bodies that fails past ``limit`` bytes."""
    size = 0

    async def limited_receive() -> dict[str, Any]:
        nonlocal size
        message = await receive()
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > limit:
                raise ConnectError(
                    ConnectCode.RESOURCE_EXHAUSTED,
                    f"request body is larger than the limit of {limit} bytes",
                )
        return message

    return limited_receive


class UnsupportedEncoding(InvalidArgument):
    """A Content-Encoding other than gzip, deflate or identity."""


class InflatedTooLarge(ResourceExhausted):
    def __init__(self, limit: int) -> None:
        super().__init__(f"decompressed request body is larger than the limit of {limit} bytes")
        self.limit = limit


_WBITS = {b"gzip": 16 + zlib.MAX_WBITS, b"x-gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}


def inflate(body: bytes, encoding: bytes | None, limit: int) -> bytes:
    """``body`` decoded as its ``Content-Encoding`` says (gzip, deflate or identity).

    Raises UnsupportedEncoding for any other encoding, InvalidArgument for a malformed or
    truncated stream and InflatedTooLarge when it inflates past ``limit`` bytes; inflation
    stops one byte past the limit, so a small "gzip bomb" costs no more than ``limit``.
    """
    name = b"identity" if encoding is None else encoding.strip().lower()
    if name in (b"identity", b""):
        return body
    wbits = _WBITS.get(name)
    if wbits is None:
        raise UnsupportedEncoding(
            f"unsupported Content-Encoding {clip(name.decode('latin-1'))!r}; "
            "use gzip, deflate or identity"
        )
    what = name.decode()
    parts: list[bytes] = []
    size = 0
    rest: bytes = body
    while True:  # gzip allows several members, one after the other (as gzip.decompress does)
        inflater = zlib.decompressobj(wbits)
        try:
            part = inflater.decompress(rest, limit + 1 - size)
        except zlib.error as exc:
            raise InvalidArgument(f"malformed {what} body: {exc}") from None
        size += len(part)
        if size > limit:
            raise InflatedTooLarge(limit)
        if not inflater.eof:
            raise InvalidArgument(f"malformed {what} body: truncated")
        parts.append(part)
        rest = inflater.unused_data
        if not rest:
            return parts[0] if len(parts) == 1 else b"".join(parts)
        if wbits == zlib.MAX_WBITS:
            raise InvalidArgument(f"malformed {what} body: bytes after the end of the stream")


def framed_receive(receive: Receive, limit: int, *, unary: bool, encoded: bool) -> Receive:
    """A receive callable for enveloped bodies (gRPC, gRPC-Web, Connect streaming).

    Fails past ``limit`` bytes (RESOURCE_EXHAUSTED), like :func:`counting_receive`, and
    checks the framing as the bytes go by: a body that ends inside a frame (its 5-byte prefix
    or its message) is INVALID_ARGUMENT, and so is a body with no message at all for a method
    that takes exactly one (``unary``). connect-python would report both as UNIMPLEMENTED
    "unary request has zero messages", or silently drop the partial frame. So is a frame
    flagged compressed when the request names no message encoding (``encoded`` false), or
    with flag bits no request may set: connect-python called both INTERNAL.
    """
    counted = counting_receive(receive, limit)
    frames = 0
    prefix = b""  # the part of the current frame's 5-byte prefix seen so far
    remaining = 0  # bytes of the current frame's message still to come

    async def framed() -> dict[str, Any]:
        nonlocal frames, prefix, remaining
        message = await counted()
        if message["type"] != "http.request":
            return message
        chunk = message.get("body", b"")
        end = len(chunk)
        at = 0
        while at < end:
            if remaining:
                step = min(remaining, end - at)
                remaining -= step
                at += step
                continue
            take = 5 - len(prefix)
            prefix += chunk[at : at + take]
            at += take
            if len(prefix) == 5:
                _check_flags(prefix[0], encoded)
                remaining = int.from_bytes(prefix[1:5], "big")
                prefix = b""
                frames += 1
        if not message.get("more_body", False):
            if prefix or remaining:
                raise ConnectError(
                    ConnectCode.INVALID_ARGUMENT,
                    "malformed request: the body ends inside a message frame (truncated)",
                )
            if unary and frames == 0:
                raise ConnectError(
                    ConnectCode.INVALID_ARGUMENT, "malformed request: the body has no message"
                )
        return message

    return framed


def _check_flags(flags: int, encoded: bool) -> None:
    if flags & ~_COMPRESSED:
        raise ConnectError(
            ConnectCode.INVALID_ARGUMENT,
            f"malformed request: message flags 0x{flags:02x}; a request may only set 0x01 "
            "(compressed)",
        )
    if flags and not encoded:
        raise ConnectError(
            ConnectCode.INVALID_ARGUMENT,
            "malformed request: a message is flagged compressed, but the request names no "
            "message encoding (grpc-encoding / connect-content-encoding)",
        )


_COMPRESSED = 0x01
