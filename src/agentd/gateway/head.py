"""HEAD, answered once for every route: GET's status and headers, never a body.

A HEAD response that carries body bytes corrupts the next response on an HTTP/1.1
keep-alive connection (the client reads them as the start of it) and is a protocol error
on HTTP/2. Rather than each route knowing about HEAD, the entry point turns a HEAD request
into a GET and drops what the GET would send as its body; a route without GET answers the
GET's 405 with its ``Allow`` header, still without a body.
"""

from __future__ import annotations

from typing import Any

from agentd.gateway.asgi import Scope, Send

__all__ = ["as_get"]

_LAST_BODY = {"type": "http.response.body", "body": b"", "more_body": False}


class _Bodiless:
    """Passes a response on without its body bytes.

    On HTTP/1.x the start is held until the body ends, so that a response without
    ``content-length`` gets the one its GET would have: Envoy frames an empty HEAD answer
    as ``transfer-encoding: chunked`` where the GET gets ``content-length: 0``. HTTP/2
    frames carry no such header, so there the start goes out as it is.
    """

    __slots__ = ("_hold", "_length", "_send", "_start")

    def __init__(self, send: Send, *, hold: bool) -> None:
        self._send = send
        self._hold = hold
        self._start: dict[str, Any] | None = None
        self._length = 0

    async def __call__(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start" and self._hold:
            self._start = message
            return
        if kind == "http.response.body":
            self._length += len(message.get("body", b""))
            if message.get("more_body", False):
                return  # nothing of it goes out; the last message ends the response
            await self._flush_start()
            await self._send(_LAST_BODY)
            return
        await self._flush_start()
        await self._send(message)

    async def _flush_start(self) -> None:
        start, self._start = self._start, None
        if start is None:
            return
        headers = list(start.get("headers", ()))
        if not any(name.lower() in _FRAMING for name, _ in headers):
            headers.append((b"content-length", str(self._length).encode()))
            start = {**start, "headers": headers}
        await self._send(start)


_FRAMING = (b"content-length", b"transfer-encoding")


def as_get(scope: Scope, send: Send) -> tuple[Scope, Send]:
    """The GET request a HEAD ``scope`` stands for, and a ``send`` that keeps GET's status
    and headers (``content-length`` included, as RFC 9110 allows) but drops its body."""
    http1 = scope.get("http_version", "1.1") in ("1.0", "1.1")
    return {**scope, "method": "GET"}, _Bodiless(send, hold=http1)
