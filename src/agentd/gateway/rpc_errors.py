"""Translate agentd errors into connect-python's ConnectError, and decoding into 400s."""

from __future__ import annotations

from typing import Any

from connectrpc import _codec as connect_codec
from connectrpc.code import Code as ConnectCode
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from google.protobuf.json_format import ParseError
from google.protobuf.message import DecodeError

from agentd.errors import AgentdError
from agentd.gateway.protocol import connect_code

__all__ = ["call_timeout", "install_strict_codecs", "to_connect_error"]


def call_timeout(ctx: RequestContext, default_s: float | None) -> float | None:
    """Seconds left of the client's deadline (``grpc-timeout`` / ``connect-timeout-ms``),
    ``default_s`` without one; DEADLINE_EXCEEDED when it has already passed."""
    remaining_ms = ctx.timeout_ms()
    if remaining_ms is None:
        return default_s
    if remaining_ms <= 0:
        raise ConnectError(ConnectCode.DEADLINE_EXCEEDED, "deadline passed before the call")
    return remaining_ms / 1000.0


def to_connect_error(exc: AgentdError) -> ConnectError:
    return ConnectError(ConnectCode(connect_code(exc.code)), exc.message)


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
