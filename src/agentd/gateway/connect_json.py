"""A fast Connect JSON adapter for unary ``AgentService/Invoke``.

connect-python decodes JSON through protobuf's ``json_format``, which costs more than the
whole agent turn for small messages. This adapter speaks the same wire format (Connect unary,
proto3 JSON mapping of ``InvokeRequest``/``InvokeResponse``) with orjson and calls the same
runtime. Requests it does not cover (compressed bodies, GET) go to connect-python.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import orjson

from agentd.agents.message import Message
from agentd.errors import AgentdError, InvalidArgument
from agentd.gateway.asgi import Send
from agentd.gateway.protocol import Protocol, header, send_error
from agentd.gateway.redact import public_message
from agentd.runtime import Runtime

__all__ = ["ConnectJsonInvoke"]

_JSON_TYPES = (b"application/json", b"application/json; charset=utf-8")
_RESPONSE_HEADERS = [(b"content-type", b"application/json")]
_REQUEST_FIELDS = frozenset({"agent", "message"})
_MESSAGE_FIELDS = frozenset({"text", "data", "metadata"})


class ConnectJsonInvoke:
    """Serves ``POST /agentd.v1.AgentService/Invoke`` with ``content-type: application/json``."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    @staticmethod
    def accepts(scope: dict[str, Any]) -> bool:
        if scope["method"] != "POST" or header(scope, b"content-type") not in _JSON_TYPES:
            return False
        encoding = header(scope, b"content-encoding")
        return encoding is None or encoding == b"identity"

    async def __call__(self, scope: dict[str, Any], body: bytes, send: Send) -> None:
        try:
            timeout = self._timeout(header(scope, b"connect-timeout-ms"))
            agent, message = _decode(body)
            address, reply = await self._runtime.invoke(agent, message, timeout=timeout)
        except AgentdError as exc:
            await send_error(send, Protocol.CONNECT, exc.code, public_message(exc.message))
            return
        payload = orjson.dumps({"agent": str(address), "message": _encode_message(reply)})
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [*_RESPONSE_HEADERS, (b"content-length", str(len(payload)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    @staticmethod
    def _timeout(raw: bytes | None) -> float | None:
        """``connect-timeout-ms`` in seconds, None without one (the runtime applies the
        node's deadline rule: its default, DEADLINE_EXCEEDED for 0)."""
        if raw is None:
            return None
        if not raw.isdigit() or len(raw) > 10:
            raise InvalidArgument(f"malformed connect-timeout-ms header {raw.decode('latin-1')!r}")
        return int(raw) / 1000.0


def _decode(body: bytes) -> tuple[str, Message]:
    try:
        data = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(f"malformed JSON request: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidArgument("malformed JSON request: expected an object")
    unknown = data.keys() - _REQUEST_FIELDS
    if unknown:
        raise InvalidArgument(f"malformed JSON request: unknown field {sorted(unknown)[0]!r}")
    agent = _string(data.get("agent"), "agent")
    raw_message = data.get("message")
    if raw_message is None:
        return agent, Message()
    if not isinstance(raw_message, dict):
        raise InvalidArgument("malformed JSON request: 'message' must be an object")
    unknown = raw_message.keys() - _MESSAGE_FIELDS
    if unknown:
        raise InvalidArgument(
            f"malformed JSON request: unknown field 'message.{sorted(unknown)[0]}'"
        )
    metadata = raw_message.get("metadata")
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidArgument("malformed JSON request: 'message.metadata' must map strings")
    return agent, Message(
        _string(raw_message.get("text"), "message.text"),
        _bytes(raw_message.get("data"), "message.data"),
        metadata,
    )


def _string(value: Any, path: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidArgument(f"malformed JSON request: {path!r} must be a string")
    return value


def _bytes(value: Any, path: str) -> bytes:
    if value is None:
        return b""
    if not isinstance(value, str):
        raise InvalidArgument(f"malformed JSON request: {path!r} must be base64 text")
    try:
        # proto3 JSON accepts standard and URL-safe base64, padded or not.
        padded = value + "=" * (-len(value) % 4)
        return base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument(f"malformed JSON request: {path!r} is not valid base64") from None


def _encode_message(message: Message) -> dict[str, Any]:
    # proto3 JSON omits fields holding their default value.
    out: dict[str, Any] = {}
    if message.text:
        out["text"] = message.text
    if message.data:
        out["data"] = base64.b64encode(message.data).decode()
    if message.metadata:
        out["metadata"] = message.metadata
    return out
