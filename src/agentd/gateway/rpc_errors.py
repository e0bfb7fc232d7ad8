"""Translate agentd errors into connect-python's ConnectError, and decoding into 400s."""

from __future__ import annotations

import gzip
import re
import zlib
from typing import Any

from connectrpc import _codec as connect_codec
from connectrpc.code import Code as ConnectCode
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from google.protobuf.json_format import ParseError
from google.protobuf.message import DecodeError

from agentd.errors import AgentdError, InvalidArgument
from agentd.gateway.admission import InflatedTooLarge, inflate
from agentd.gateway.protocol import Protocol, clip, connect_code, header
from agentd.gateway.redact import public_message

__all__ = [
    "ACCEPTED_ENCODINGS",
    "BoundedDeflate",
    "BoundedGzip",
    "call_timeout",
    "check_grpc_headers",
    "check_grpc_timeout",
    "compressions",
    "declares_encoding",
    "install_strict_codecs",
    "message_encoding",
    "refused_encoding",
    "to_connect_error",
]

# gRPC over HTTP/2: "Timeout -> TimeoutValue TimeoutUnit", at most 8 ASCII digits.
_GRPC_TIMEOUT = re.compile(rb"[0-9]{1,8}[HMSmun]")


def call_timeout(ctx: RequestContext) -> float | None:
    """Seconds left of the client's deadline (``grpc-timeout`` / ``connect-timeout-ms``), or
    None without one. Only a conversion: the service the call reaches applies the node's
    deadline rule (its default for None, DEADLINE_EXCEEDED for a deadline already past)."""
    remaining_ms = ctx.timeout_ms()
    return None if remaining_ms is None else remaining_ms / 1000.0


def to_connect_error(exc: AgentdError) -> ConnectError:
    """The client's view of ``exc``: its code, and its message without server file paths."""
    return ConnectError(ConnectCode(connect_code(exc.code)), public_message(exc.message))


class _StrictCodec:
    """Wraps a connect-python codec so undecodable input is INVALID_ARGUMENT, not UNKNOWN."""

    def __init__(self, inner: Any, what: str) -> None:
        self._inner = inner
        self._what = what

    def name(self) -> str:
        return self._inner.name()

    def encode(self, message: Any) -> bytes:
        return self._inner.encode(message)

    def decode(self, data: bytes | bytearray, message: Any) -> Any:
        try:
            return self._inner.decode(data, message)
        except (DecodeError, ParseError, ValueError, TypeError, UnicodeDecodeError) as exc:
            raise ConnectError(
                ConnectCode.INVALID_ARGUMENT, f"malformed {self._what} request: {exc}"
            ) from exc


def install_strict_codecs() -> None:
    """Replace connect-python's codec table entries with strict wrappers (idempotent).

    connect-python looks codecs up by name in one module-level table and reports a decode
    failure as UNKNOWN; clients deserve INVALID_ARGUMENT naming the parse error. The
    integration tests send malformed protobuf and JSON to pin this behaviour.
    """
    table = connect_codec._codecs
    for name, codec in list(table.items()):
        if not isinstance(codec, _StrictCodec):
            what = "protobuf" if codec.name() == "proto" else "JSON"
            table[name] = _StrictCodec(codec, what)


class BoundedGzip:
    """connect-python's gzip compression, with the request side made safe.

    connect-python inflates with ``gzip.decompress``: a malformed body raises a bare
    ``BadGzipFile`` or ``EOFError`` (reported as UNKNOWN, an HTTP 500) and nothing bounds the
    inflated size before it is all in memory. Here a bad stream is INVALID_ARGUMENT
    "malformed gzip body" and inflation stops one byte past ``limit`` (RESOURCE_EXHAUSTED).
    """

    def __init__(self, limit: int, level: int = 6) -> None:
        self._limit = limit
        self._level = level

    def name(self) -> str:
        return "gzip"

    def compress(self, data: bytes | bytearray | memoryview) -> bytes:
        return gzip.compress(data, compresslevel=self._level)

    def decompress(self, data: bytes | bytearray | memoryview) -> bytes:
        try:
            return inflate(bytes(data), self.name().encode(), self._limit)
        except InflatedTooLarge as exc:
            raise ConnectError(ConnectCode.RESOURCE_EXHAUSTED, exc.message) from None
        except InvalidArgument as exc:
            raise ConnectError(ConnectCode.INVALID_ARGUMENT, exc.message) from None


class BoundedDeflate(BoundedGzip):
    """``deflate`` (zlib format, as HTTP, gRPC and Connect mean it), bounded like gzip."""

    def name(self) -> str:
        return "deflate"

    def compress(self, data: bytes | bytearray | memoryview) -> bytes:
        return zlib.compress(data, self._level)


def compressions(limit: int) -> list[BoundedGzip]:
    """The message encodings every RPC app speaks (identity is always there too)."""
    return [BoundedGzip(limit), BoundedDeflate(limit)]


ACCEPTED_ENCODINGS = b"identity, gzip, deflate"
_ENCODINGS = frozenset({b"identity", b"gzip", b"deflate"})


def message_encoding(scope: dict[str, Any], protocol: Protocol) -> tuple[bytes, bytes]:
    """The header that names how a request's messages are encoded, for ``protocol``, and
    the header that answers which encodings the server accepts."""
    if protocol in (Protocol.GRPC, Protocol.GRPC_WEB):
        return b"grpc-encoding", b"grpc-accept-encoding"
    if (header(scope, b"content-type") or b"").startswith(b"application/connect+"):
        return b"connect-content-encoding", b"connect-accept-encoding"
    return b"content-encoding", b"accept-encoding"


def declares_encoding(scope: dict[str, Any], protocol: Protocol) -> bool:
    """Whether the request names a message encoding other than identity (so its frames
    may be flagged compressed)."""
    value = header(scope, message_encoding(scope, protocol)[0])
    return value is not None and value != b"identity"


def refused_encoding(
    scope: dict[str, Any], protocol: Protocol
) -> tuple[str, list[tuple[bytes, bytes]]] | None:
    """Why an RPC request's message encoding is refused, with the header listing the
    accepted ones; None when the server speaks it.

    Both protocols ask for UNIMPLEMENTED naming the accepted encodings (gRPC in
    ``grpc-accept-encoding``, Connect in ``accept-encoding`` or, streaming,
    ``connect-accept-encoding``); connect-python answered without them, and a Connect
    stream got INTERNAL.
    """
    name, accept = message_encoding(scope, protocol)
    value = header(scope, name)
    if value is None or value in _ENCODINGS:
        return None
    message = (
        f"unsupported {name.decode()} {clip(value.decode('latin-1'))!r}; "
        f"this server accepts {ACCEPTED_ENCODINGS.decode()}"
    )
    return message, [(accept, ACCEPTED_ENCODINGS)]


def check_grpc_headers(scope: dict[str, Any], protocol: Protocol) -> str | None:
    """Why a gRPC or gRPC-Web request's headers are refused (INVALID_ARGUMENT), or None:
    a malformed ``grpc-timeout``, or gRPC without ``te: trailers``.

    The server sends no trailers to a request that did not ask for them, and gRPC carries
    the call's status in the trailers: such a call ended with no status at all (a client
    reads INTERNAL). The gRPC protocol makes the header mandatory; refusing it up front,
    with the status in the headers, is the answer such a client can read.
    """
    problem = check_grpc_timeout(header(scope, b"grpc-timeout"))
    if problem is None and protocol is Protocol.GRPC:
        te = header(scope, b"te") or b""
        if b"trailers" not in te.lower():
            problem = "gRPC requests must send 'te: trailers' (the server sends the status there)"
    return problem


def check_grpc_timeout(raw: bytes | None) -> str | None:
    """Why a ``grpc-timeout`` header is malformed, or None when it is absent or well formed.

    connect-python parses it with ``int()`` and reports a bad value as a ValueError, which
    becomes an HTTP 500 with a Connect JSON body that no gRPC client can read.
    """
    if not raw or _GRPC_TIMEOUT.fullmatch(raw):
        return None
    return (
        f"malformed grpc-timeout header {clip(raw.decode('latin-1'))!r}: "
        "expected at most 8 digits and a unit (H, M, S, m, u or n)"
    )
