"""Call an ASGI app in process: one HTTP request, or its lifespan, with the messages it sent.

No server and no sockets: the app (the gateway, or any ASGI app) gets a scope built here,
a ``receive`` that yields the request body and then ``http.disconnect``, and a ``send``
that records every message::

    response = await asgi_request(gateway, "POST", "/agentd.v1.AgentService/Nope",
                                  headers={"content-type": "application/grpc"})
    assert response.grpc_status == 12  # UNIMPLEMENTED

    async with AsgiLifespan(gateway) as started:
        assert started["type"] == "lifespan.startup.complete"
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import orjson

__all__ = ["AsgiLifespan", "AsgiResponse", "asgi_request"]

App = Callable[
    [dict[str, Any], Callable[[], Awaitable[dict[str, Any]]], Callable[[dict], Awaitable[None]]],
    Awaitable[None],
]


@dataclass
class AsgiResponse:
    """What the app sent for one request."""

    messages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def start(self) -> dict[str, Any]:
        starts = [m for m in self.messages if m["type"] == "http.response.start"]
        assert len(starts) == 1, f"expected one http.response.start, got {self.messages}"
        return starts[0]

    @property
    def status(self) -> int:
        return self.start["status"]

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        return list(self.start.get("headers", ()))

    def header(self, name: str) -> str | None:
        """The first value of response header ``name`` (case-insensitive), or None."""
        wanted = name.lower().encode()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value.decode("latin-1")
        return None

    @property
    def trailers(self) -> list[tuple[bytes, bytes]]:
        return [
            pair
            for m in self.messages
            if m["type"] == "http.response.trailers"
            for pair in m.get("headers", ())
        ]

    @property
    def body(self) -> bytes:
        return b"".join(
            m.get("body", b"") for m in self.messages if m["type"] == "http.response.body"
        )

    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def grpc_status(self) -> int | None:
        """The grpc-status of a gRPC answer (in the headers of a trailers-only answer, or in
        the trailers), or None."""
        for key, value in [*self.headers, *self.trailers]:
            if key.lower() == b"grpc-status":
                return int(value)
        return None


async def asgi_request(
    app: App,
    method: str,
    path: str,
    *,
    headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
    body: bytes | Iterable[bytes] = b"",
    query_string: bytes = b"",
    http_version: str = "1.1",
    timeout: float = 30.0,
) -> AsgiResponse:
    """Send one HTTP request to ``app`` and collect what it sends back.

    ``body`` is one chunk, or several (sent as ``more_body`` messages); once it is read,
    ``receive`` waits until the response has ended, then says ``http.disconnect``.
    """
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    chunks = [body] if isinstance(body, bytes) else list(body)
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": http_version,
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query_string,
        "root_path": "",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in pairs],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
        "extensions": {"http.response.trailers": {}},  # gRPC needs trailers; Envoy has them
    }
    response = AsgiResponse()
    ended = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if chunks:
            chunk = chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}
        await ended.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        response.messages.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            ended.set()

    try:
        await asyncio.wait_for(app(scope, receive, send), timeout)
    finally:
        ended.set()
    return response


class AsgiLifespan:
    """Drives an app's ASGI lifespan: ``async with`` sends ``lifespan.startup`` and gives
    the app's answer (``lifespan.startup.complete`` or ``.failed``); leaving the block
    sends ``lifespan.shutdown`` after a completed start and waits for the app to end."""

    def __init__(self, app: App, *, timeout: float = 60.0) -> None:
        self._app = app
        self._timeout = timeout
        self._to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.sent: list[dict[str, Any]] = []

    async def _send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        await self._from_app.put(message)

    async def __aenter__(self) -> dict[str, Any]:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}}

        async def run() -> None:  # App promises an awaitable; a task needs a coroutine
            await self._app(scope, self._to_app.get, self._send)

        self._task = asyncio.create_task(run())
        await self._to_app.put({"type": "lifespan.startup"})
        return await self._next()

    async def _next(self) -> dict[str, Any]:
        assert self._task is not None
        answer = asyncio.ensure_future(self._from_app.get())
        done, _ = await asyncio.wait(
            [answer, self._task], timeout=self._timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if answer in done:
            return answer.result()
        answer.cancel()
        if self._task in done:
            self._task.result()  # raises what the app raised
            raise AssertionError("the app's lifespan ended without an answer")
        raise TimeoutError(f"no lifespan answer within {self._timeout}s")

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._task is not None
        started = any(m["type"] == "lifespan.startup.complete" for m in self.sent)
        if started and not self._task.done():
            await self._to_app.put({"type": "lifespan.shutdown"})
            await self._next()
        try:
            await asyncio.wait_for(self._task, self._timeout)
        finally:
            if not self._task.done():
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
