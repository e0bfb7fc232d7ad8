"""Admission checks before a request reaches a handler: bearer tokens and body size."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

from connectrpc.code import Code as ConnectCode
from connectrpc.errors import ConnectError

__all__ = ["BodyTooLarge", "TokenCheck", "buffer_body", "counting_receive", "replay"]

Receive = Callable[[], Awaitable[dict[str, Any]]]


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
