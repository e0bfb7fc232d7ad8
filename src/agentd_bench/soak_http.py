"""A small HTTP/1.1 keep-alive client for the soak's load generator: h11 for the protocol
(the parser httpx itself runs on), asyncio streams for the I/O, a free list of connections.

Why not httpx's own pool: at 64 requests in flight its pool costs the client more than the
server spends on the request (encode/httpx#3215). Measured against the same agentd on the
project's 2-core machine: httpx 55-100 req/s with 4-7 s worst cases, against ~1,000 req/s and
0.2 s for a plain asyncio client, while h2load showed the server itself at ~9,000 req/s.
A soak whose client is the bottleneck measures the client.

Each request takes an idle connection or opens one, writes the whole request at once, and
gives the connection back only when both sides finished the exchange; anything else (a
timeout, a cancelled or abandoned stream) closes it. A request that fails on a reused
connection before any byte of the answer arrived is retried once on a new one: the server
may close an idle keep-alive connection at any time, which is not an error.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import h11

from agentd.errors import Unavailable
from agentd_bench.errors import BenchError

__all__ = ["HttpPool", "Response", "StreamResponse", "TransportError"]

_READ_SIZE = 65536


class TransportError(BenchError, Unavailable):
    """The connection failed or the server broke the protocol."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes


class _Connection:
    def __init__(
        self, host: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.host, self.reader, self.writer = host, reader, writer
        self.h11 = h11.Connection(our_role=h11.CLIENT)
        self.reused = False
        self.received = False  # any byte of the current answer

    async def send(
        self, method: str, target: str, headers: Sequence[tuple[str, str]], body: bytes
    ) -> None:
        # One write for the whole request, as a browser or h2load sends a small one.
        head = [("host", self.host), ("content-length", str(len(body))), *headers]
        parts = [self.h11.send(h11.Request(method=method, target=target, headers=head))]
        if body:
            parts.append(self.h11.send(h11.Data(data=body)))
        parts.append(self.h11.send(h11.EndOfMessage()))
        self.writer.write(b"".join(p for p in parts if p))
        await self.writer.drain()

    async def next_event(self) -> h11.Event:
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise TransportError(f"protocol error from the server: {exc}") from exc
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            data = await self.reader.read(_READ_SIZE)
            if data:
                self.received = True
            self.h11.receive_data(data)

    def reusable(self) -> bool:
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE

    def close(self) -> None:
        self.writer.close()


class StreamResponse:
    """An answer read as it arrives; leaving ``HttpPool.stream`` before its end closes the
    connection (the server sees the client go)."""

    def __init__(self, conn: _Connection, status: int) -> None:
        self._conn, self.status = conn, status
        self.complete = False

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            event = await self._conn.next_event()
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self.complete = True
                return
            elif isinstance(event, h11.ConnectionClosed):
                raise TransportError("connection closed before the end of the answer")

    async def lines(self) -> AsyncIterator[str]:
        pending = b""
        async for chunk in self.chunks():
            pending += chunk
            *whole, pending = pending.split(b"\n")
            for line in whole:
                yield line.rstrip(b"\r").decode("utf-8", "replace")
        if pending:
            yield pending.decode("utf-8", "replace")

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])


class HttpPool:
    """Keep-alive HTTP/1.1 connections to one ``host:port``; at most ``max_idle`` kept idle."""

    def __init__(self, host: str, port: int, max_idle: int = 64) -> None:
        self._host, self._port, self._max_idle = host, port, max_idle
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()

    @property
    def num_open(self) -> int:
        """Connections open now, idle or busy."""
        return len(self._open)

    async def _connect(self) -> _Connection:
        try:
            reader, writer = await asyncio.open_connection(self._host, self._port)
        except OSError as exc:
            raise TransportError(f"cannot connect: {exc}") from exc
        conn = _Connection(f"{self._host}:{self._port}", reader, writer)
        self._open.add(conn)
        return conn

    def _release(self, conn: _Connection) -> None:
        if conn.reusable() and len(self._idle) < self._max_idle:
            conn.h11.start_next_cycle()
            conn.reused, conn.received = True, False
            self._idle.append(conn)
        else:
            self._open.discard(conn)
            conn.close()

    async def _start(
        self, method: str, target: str, headers: Sequence[tuple[str, str]], body: bytes
    ) -> tuple[_Connection, int]:
        """Send the request and read the answer's head, retrying once as described above."""
        for attempt in range(2):
            conn = self._idle.pop() if self._idle else await self._connect()
            try:
                await conn.send(method, target, headers, body)
                event = await conn.next_event()
                while isinstance(event, h11.InformationalResponse):
                    event = await conn.next_event()
                if isinstance(event, h11.Response):
                    return conn, event.status_code
                raise TransportError(f"connection closed before an answer ({type(event).__name__})")
            except (OSError, TransportError) as exc:
                self._open.discard(conn)
                conn.close()
                if attempt == 0 and conn.reused and not conn.received:
                    continue  # the server closed an idle connection: a fresh one
                if isinstance(exc, TransportError):
                    raise
                raise TransportError(f"{type(exc).__name__}: {exc}") from exc
            except BaseException:
                self._open.discard(conn)
                conn.close()
                raise
        raise AssertionError("unreachable")

    async def request(
        self, method: str, target: str, body: bytes = b"", headers: Sequence[tuple[str, str]] = ()
    ) -> Response:
        async with self.stream(method, target, body, headers) as response:
            return Response(response.status, await response.read())

    @contextlib.asynccontextmanager
    async def stream(
        self, method: str, target: str, body: bytes = b"", headers: Sequence[tuple[str, str]] = ()
    ) -> AsyncIterator[StreamResponse]:
        conn, status = await self._start(method, target, headers, body)
        response = StreamResponse(conn, status)
        try:
            yield response
        except OSError as exc:
            self._open.discard(conn)
            conn.close()
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            if response.complete:
                self._release(conn)
            elif conn in self._open:
                self._open.discard(conn)
                conn.close()

    async def aclose(self) -> None:
        for conn in list(self._open):
            conn.close()
        self._open.clear()
        self._idle.clear()
