"""Peer connections: one node's actor host served to the other nodes, and the client of
each remote node (docs/cluster.md, Forwarding).

Endpoints are ``unix:/path`` or ``tcp:host:port``. A connection carries frames, each a
13-byte head (4-byte length of what follows, 1-byte kind, 8-byte call id) and a body in
the wire format of ``agentd.cluster.codec``:

    TELLS   a batch of tells (many addresses and messages in one frame, and the senders'
            trace contexts when they were traced; id 0)
    ASK     (address, message, remaining seconds or None, traceparent or None)
    STREAM  the same, for a streaming turn
    CANCEL  the caller gave up on call ``id``: the owner cancels its turn
    REPLY   (True, value) or (False, error)
    EVENT   one event of a stream
    END     the stream ended

Tells are buffered per peer and written once per event-loop iteration as one frame. The
server applies them in order with ``host.tell_nowait`` and, when the owner's run queue is
full, stops reading the socket until there is room, so the sender's write buffer fills and
its ``tell_nowait`` says "no room": backpressure crosses the socket, no tell is dropped.
A tell that carries its sender's trace context is applied under it (when this node traces),
so its turn is a child of the sender's span, as for a tell between agents of one node.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import struct
from collections.abc import AsyncGenerator
from typing import Any, cast

from agentd.agents.address import Address
from agentd.cluster import codec
from agentd.errors import (
    AgentdError,
    ConfigError,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    Unavailable,
)
from agentd.observability import trace_wire
from agentd.observability.cluster_metrics import NO_METRICS, ClusterObserver
from agentd.observability.tracing import current_traceparent, traced

__all__ = ["NotSent", "PeerClient", "PeerServer", "parse_endpoint"]

log = logging.getLogger(__name__)

TELLS, ASK, STREAM, CANCEL, REPLY, EVENT, END = range(1, 8)
_KINDS = frozenset(range(1, 8))
_HEAD = struct.Struct("<IBQ")
HEAD_SIZE = _HEAD.size  # 13
MAX_FRAME = 64 * 1024 * 1024
CONNECT_TIMEOUT = 1.0
RETRY_AFTER = 0.25  # a peer that refused a connection is not tried again before this
_HIGH_WATER = 4 * 1024 * 1024  # client write buffer: tell_nowait says "no room" above it
_PENDING_TELLS = 65_536  # tells held while connecting


class NotSent(Unavailable):
    """The call never left this node (no connection to its owner): safe to retry."""


def parse_endpoint(endpoint: str) -> tuple[str, str | tuple[str, int]]:
    """``("unix", path)`` or ``("tcp", (host, port))``; ConfigError when malformed."""
    scheme, _, rest = endpoint.partition(":")
    if scheme == "unix" and rest:
        return "unix", rest
    if scheme == "tcp":
        host, _, port = rest.rpartition(":")
        if host and port.isdigit() and int(port) <= 65535:
            return "tcp", (host.strip("[]"), int(port))
    raise ConfigError(
        f"peer endpoint {endpoint[:200]!r} is not unix:/path or tcp:host:port (port 0-65535)"
    )


class _Frames(asyncio.Protocol):
    """Length-prefixed frames in, one call of ``frame`` per frame; a frame over the size
    limit, or one ``frame`` refuses (CodecError), closes the connection with one log line."""

    transport: asyncio.Transport | None = None

    def __init__(self, max_frame: int) -> None:
        self._buffer = bytearray()
        self._max_frame = max_frame
        self._held = False  # frames are not read on while the owner has no room

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not isinstance(asyncio.Transport): uvloop's transports (the gateway's and the
        # swarm's loop) are not its subclasses, though they have its methods.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._read_frames()

    def _read_frames(self) -> None:
        buffer = self._buffer
        pos = 0
        end_of_data = len(buffer)
        try:
            while not self._held and end_of_data - pos >= HEAD_SIZE:
                size, kind, call = _HEAD.unpack_from(buffer, pos)
                if size > self._max_frame or size < 9 or kind not in _KINDS:
                    raise codec.CodecError(
                        f"a frame of kind {kind} and {size} bytes (the limit: {self._max_frame})"
                    )
                end = pos + 4 + size
                if end > end_of_data:
                    break
                body = bytes(buffer[pos + HEAD_SIZE : end])
                pos = end
                self.frame(kind, call, body)
        except codec.CodecError as exc:
            self._malformed(exc)
            return
        finally:
            del buffer[:pos]

    def _malformed(self, error: BaseException) -> None:
        log.warning("closing a peer connection that sent a malformed frame: %s", error)
        self._buffer.clear()
        self._held = True
        if self.transport is not None:
            self.transport.abort()

    def frame(self, kind: int, call: int, body: bytes) -> None:
        raise NotImplementedError

    def send(self, kind: int, call: int, body: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(_HEAD.pack(len(body) + 9, kind, call) + body)


# -- the server: this node's host, for other nodes ---------------------------------------


class PeerServer:
    """Serves ``host`` (an ActorHost) to the other nodes on ``listen`` (``unix:/path`` or
    ``tcp:host:port``; port 0 picks a free one: see :attr:`endpoint`). ``tracer``: an
    OpenTelemetry tracer for a span around each forwarded call, or None."""

    def __init__(
        self,
        host: Any,
        listen: str,
        *,
        name: str = "",
        tracer: Any = None,
        max_frame: int = MAX_FRAME,
    ) -> None:
        self.host = host
        self.listen = listen
        self.name = name
        self.tracer = tracer
        self.max_frame = max_frame
        self._scheme, self._address = parse_endpoint(listen)
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_ServerConnection] = set()
        self.endpoint = listen
        self.tells_received = 0
        self.frames_received = 0
        self.pauses = 0  # times the owner's full run queue stopped reading a connection

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._scheme == "unix":
            path = str(self._address)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # a socket file left by a process that died
            self._server = await loop.create_unix_server(self._protocol, path)
        else:
            host, port = cast(tuple[str, int], self._address)
            self._server = await loop.create_server(self._protocol, host, port)
            bound = self._server.sockets[0].getsockname()
            self.endpoint = f"tcp:{host}:{bound[1]}"

    def _protocol(self) -> _ServerConnection:
        return _ServerConnection(self)

    async def aclose(self) -> None:
        """Stop accepting; answer every call in progress with Unavailable; close."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for connection in list(self._connections):
            connection.shut(Unavailable(f"node {self.name} is shutting down; retry"))
        if server is not None:
            await server.wait_closed()
        if self._scheme == "unix":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(str(self._address))


class _ServerConnection(_Frames):
    def __init__(self, server: PeerServer) -> None:
        super().__init__(server.max_frame)
        self._server = server
        self._host = server.host
        self._calls: dict[int, asyncio.Task[None]] = {}
        self._cancelled: set[int] = set()  # calls the caller gave up: no reply
        self._blocked: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._server._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._connections.discard(self)
        self._held = True
        for call in list(self._calls):
            self._cancelled.add(call)
            self._calls[call].cancel()
        if self._blocked is not None:
            self._blocked.cancel()
        self.transport = None

    def shut(self, error: AgentdError) -> None:
        for call, task in list(self._calls.items()):
            self._cancelled.add(call)
            task.cancel()
            self.send(REPLY, call, codec.encode((False, error)))
        if self.transport is not None:
            self.transport.close()

    def frame(self, kind: int, call: int, body: bytes) -> None:
        server = self._server
        server.frames_received += 1
        if kind == TELLS:
            addresses, messages, packed = codec.decode_traced_tells(body)
            server.tells_received += len(addresses)
            if packed is not None and getattr(self._host, "spans", None) is not None:
                self._tell(addresses, messages, 0, _contexts(packed))
            else:  # no trace context, or this node does not trace
                self._tell(addresses, messages, 0)
        elif kind in (ASK, STREAM):
            run = self._ask if kind == ASK else self._stream
            task = asyncio.get_running_loop().create_task(run(call, body))
            self._calls[call] = task
            task.add_done_callback(functools.partial(self._done, call))
        elif kind == CANCEL:
            running = self._calls.get(call)
            if running is not None:
                self._cancelled.add(call)
                running.cancel()
        else:
            raise codec.CodecError(f"a peer server got a frame of kind {kind}")

    def _done(self, call: int, _task: object = None) -> None:
        self._calls.pop(call, None)
        self._cancelled.discard(call)

    def _tell(
        self,
        addresses: list[Address],
        messages: list[Any],
        start: int,
        contexts: list[object] | None = None,
    ) -> None:
        """Apply tells from ``start`` on; ``contexts``: each one's trace context (from
        ``trace_wire.unpack``) or None, current while it is told."""
        tell_nowait = self._host.tell_nowait
        for index in range(start, len(addresses)):
            try:
                if contexts is None or (context := contexts[index]) is None:
                    told = tell_nowait(addresses[index], messages[index])
                else:
                    token = trace_wire.attach(context)
                    try:
                        told = tell_nowait(addresses[index], messages[index])
                    finally:
                        trace_wire.detach(token)
                if not told:
                    # The run queue is full: read nothing more until these are in.
                    self._held = True
                    self._server.pauses += 1
                    if self.transport is not None:
                        self.transport.pause_reading()
                    self._blocked = asyncio.get_running_loop().create_task(
                        self._tell_later(addresses, messages, index, contexts)
                    )
                    return
            except AgentdError as exc:
                # The sender was told "delivered" long ago; all that is left is to say why.
                log.warning("a forwarded tell to %s failed: %s", addresses[index], exc)

    async def _tell_later(
        self,
        addresses: list[Address],
        messages: list[Any],
        index: int,
        contexts: list[object] | None,
    ) -> None:
        host = self._host
        context = contexts[index] if contexts is not None else None
        # This task's own context: current until the tell is in (its turn's parent).
        token = trace_wire.attach(context) if context is not None else None
        try:
            while True:
                try:
                    await host.tell(addresses[index], messages[index])
                except DeadlineExceeded:
                    continue  # no room for a long while: keep waiting, never drop it
                except AgentdError as exc:
                    log.warning("a forwarded tell to %s failed: %s", addresses[index], exc)
                break
        finally:
            if token is not None:
                trace_wire.detach(token)
        self._blocked = None
        self._held = False
        self._tell(addresses, messages, index + 1, contexts)
        if self._held or self.transport is None:
            return
        self._read_frames()
        if not self._held and self.transport is not None:
            self.transport.resume_reading()

    def _call(self, body: bytes) -> tuple[Address, Any, float | None, str | None]:
        address, message, timeout, traceparent = codec.decode(body)
        if (
            type(address) is not Address
            or (timeout is not None and type(timeout) is not float)
            or (traceparent is not None and type(traceparent) is not str)
        ):
            raise InvalidArgument("a malformed forwarded call")
        if timeout is not None and timeout <= 0:
            raise DeadlineExceeded(f"agent {address}: the deadline passed on the way here")
        return address, message, timeout, traceparent

    async def _ask(self, call: int, body: bytes) -> None:
        try:
            address, message, timeout, traceparent = self._call(body)
            with traced(traceparent, self._server.tracer, "agentd.forwarded.ask"):
                value = await self._host.ask(address, message, timeout=timeout)
            reply = _reply(value)
        except asyncio.CancelledError:
            if call in self._cancelled:
                return  # the caller gave up (or we are shutting down and told it)
            raise
        except AgentdError as exc:
            reply = codec.encode((False, exc))
        except Exception as exc:  # an agent's own error: the caller gets INTERNAL
            reply = codec.encode((False, Internal(f"{type(exc).__name__}: {exc}")))
        self.send(REPLY, call, reply)

    async def _stream(self, call: int, body: bytes) -> None:
        try:
            address, message, timeout, traceparent = self._call(body)
            with traced(traceparent, self._server.tracer, "agentd.forwarded.stream"):
                events = self._host.ask_stream(address, message, timeout=timeout)
                try:
                    async for event in events:
                        self.send(EVENT, call, _encode_event(event))
                finally:
                    await events.aclose()
            self.send(END, call, b"")
            return
        except asyncio.CancelledError:
            if call in self._cancelled:
                return
            raise
        except AgentdError as exc:
            reply = codec.encode((False, exc))
        except Exception as exc:
            reply = codec.encode((False, Internal(f"{type(exc).__name__}: {exc}")))
        self.send(REPLY, call, reply)


def _contexts(packed: list[bytes | None]) -> list[object]:
    """Each tell's trace context from its 25 bytes (one context per distinct run)."""
    made: dict[bytes | None, object] = {None: None}
    contexts = []
    for raw in packed:
        context = made.get(raw, made)
        if context is made:
            context = made[raw] = trace_wire.unpack(raw)  # type: ignore[arg-type]
        contexts.append(context)
    return contexts


def _reply(value: Any) -> bytes:
    try:
        return codec.encode((True, value))
    except codec.CodecError as exc:
        return codec.encode((False, Internal(f"the agent's reply cannot cross nodes: {exc}")))


def _encode_event(event: Any) -> bytes:
    try:
        return codec.encode(event)
    except codec.CodecError as exc:
        raise Internal(f"the agent's event cannot cross nodes: {exc}") from None


# -- the client of one remote node -------------------------------------------------------


class _ClientConnection(_Frames):
    def __init__(self, client: PeerClient) -> None:
        super().__init__(client.max_frame)
        self._client = client
        self.calls: dict[int, asyncio.Future[Any] | asyncio.Queue[Any]] = {}
        self.paused = False
        self.room: asyncio.Future[None] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.set_write_buffer_limits(high=_HIGH_WATER)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        room, self.room = self.room, None
        if room is not None and not room.done():
            room.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        self._client._lost(self, exc)

    def frame(self, kind: int, call: int, body: bytes) -> None:
        waiter = self.calls.get(call)
        if waiter is None:
            return  # a call given up already
        if kind == REPLY:
            ok, value = codec.decode(body)
            if type(waiter) is asyncio.Queue:
                waiter.put_nowait(_Failed(value) if not ok else _END)
            elif not waiter.done():  # type: ignore[union-attr]
                if ok:
                    waiter.set_result(value)  # type: ignore[union-attr]
                else:
                    waiter.set_exception(_error(value))  # type: ignore[union-attr]
        elif kind == EVENT and type(waiter) is asyncio.Queue:
            waiter.put_nowait(codec.decode(body))
        elif kind == END and type(waiter) is asyncio.Queue:
            waiter.put_nowait(_END)
        else:
            raise codec.CodecError(f"a peer client got a frame of kind {kind} for call {call}")


_END = object()


class _Failed:
    __slots__ = ("error",)

    def __init__(self, error: Any) -> None:
        self.error = error


def _error(value: Any) -> AgentdError:
    return value if isinstance(value, AgentdError) else Internal(f"a peer answered {value!r}")


class PeerClient:
    """The connection to one remote node (``node``, at ``endpoint``), opened on first use
    and again after it is lost. Tells are batched; asks and streams keep the caller's
    deadline, cancellation and trace context."""

    def __init__(
        self,
        node: str,
        endpoint: str,
        *,
        observer: ClusterObserver = NO_METRICS,
        connect_timeout: float = CONNECT_TIMEOUT,
        max_frame: int = MAX_FRAME,
    ) -> None:
        self.node = node
        self.endpoint = endpoint
        self._scheme, self._address = parse_endpoint(endpoint)
        self._observer = observer
        self._connect_timeout = connect_timeout
        self.max_frame = max_frame
        self._connection: _ClientConnection | None = None
        self._connecting: asyncio.Task[_ClientConnection] | None = None
        self._down_until = 0.0
        self._down_error: Unavailable | None = None
        self._ids = itertools.count(1)
        self._addresses: list[Address] = []
        self._messages: list[Any] = []
        # The buffered tells' trace contexts (25 bytes or None each), from the first tell
        # sent under one until the next flush; None while no buffered tell has one.
        self._contexts: list[bytes | None] | None = None
        self._packed_for: object = None  # the context last packed, and its bytes
        self._packed: bytes | None = None
        self._flush_handle: asyncio.Handle | None = None
        self._closed = False
        self.frames_sent = 0
        self.tells_sent = 0
        self.tells_lost = 0

    def _unreachable(self, why: object = "") -> Unavailable:
        detail = f" ({why})" if why else ""
        return Unavailable(f"node {self.node} is unreachable{detail}; retry")

    # -- connecting ----------------------------------------------------------------------

    async def connection(self, *, fresh: bool = False) -> _ClientConnection:
        """The open connection, opening it if needed; NotSent when the node cannot be
        reached (at once while a recent attempt failed, unless ``fresh``)."""
        connection = self._connection
        if connection is not None and not connection.closed:
            return connection
        if self._closed:
            raise NotSent(f"node {self.node}: the peer client is closed")
        loop = asyncio.get_running_loop()
        if not fresh and loop.time() < self._down_until and self._down_error is not None:
            raise NotSent(self._down_error.message)
        if self._connecting is None:
            self._connecting = loop.create_task(self._connect())
        return await asyncio.shield(self._connecting)

    async def _connect(self) -> _ClientConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                if self._scheme == "unix":
                    _, protocol = await loop.create_unix_connection(
                        lambda: _ClientConnection(self), str(self._address)
                    )
                else:
                    host, port = cast(tuple[str, int], self._address)
                    _, protocol = await loop.create_connection(
                        lambda: _ClientConnection(self), host, port
                    )
        except (OSError, TimeoutError) as exc:
            if isinstance(exc, TimeoutError):
                why = f"no answer within {self._connect_timeout:g}s"
            else:
                why = exc.strerror or type(exc).__name__
            self._down_until = loop.time() + RETRY_AFTER
            self._down_error = self._unreachable(why)
            self._drop_tells(f"cannot connect: {why}")
            raise NotSent(self._down_error.message) from None
        finally:
            self._connecting = None
        self._connection = protocol
        self._down_error = None
        if self._addresses and self._flush_handle is None:
            self._flush_handle = loop.call_soon(self._flush)
        return protocol

    def _lost(self, connection: _ClientConnection, exc: Exception | None) -> None:
        if self._connection is connection:
            self._connection = None
        error = self._unreachable("connection lost")
        for waiter in connection.calls.values():
            if type(waiter) is asyncio.Queue:
                waiter.put_nowait(_Failed(error))
            elif not waiter.done():  # type: ignore[union-attr]
                waiter.set_exception(error)  # type: ignore[union-attr]
        connection.calls.clear()
        room, connection.room = connection.room, None
        if room is not None and not room.done():
            room.set_exception(error)
        if not self._closed:
            log.info("the connection to node %s was lost (%s)", self.node, exc or "closed")

    def _drop_tells(self, why: str) -> None:
        lost = len(self._addresses)
        if lost:
            self.tells_lost += lost
            log.warning("%d tells to node %s were lost: %s", lost, self.node, why)
            self._addresses = []
            self._messages = []
            self._contexts = None

    # -- tells ---------------------------------------------------------------------------

    def tell_nowait(self, address: Address, message: Any, context: object = None) -> bool:
        """Queue a tell for the next batch; False when there is no room (the socket's
        write buffer is full, or too many wait for a connection); Unavailable when the
        node was unreachable just now; CodecError for a message that cannot be sent.
        ``context``: the sender's trace context (tracing on), carried with the tell."""
        connection = self._connection
        if connection is None or connection.closed:
            if len(self._addresses) >= _PENDING_TELLS:
                return False
            loop = asyncio.get_running_loop()
            if self._closed or (loop.time() < self._down_until and self._down_error is not None):
                raise self._down_error or self._unreachable("closed")
            if self._connecting is None:
                self._connecting = loop.create_task(self._connect())
                # Consumed here: a failure is reported to the next caller instead.
                self._connecting.add_done_callback(_consume)
        elif connection.paused:
            return False
        codec.check(message)
        if context is not None or self._contexts is not None:
            self._trace(context)
        self._addresses.append(address)
        self._messages.append(message)
        if self._flush_handle is None and connection is not None and not connection.closed:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)
        return True

    def _trace(self, context: object) -> None:
        """Record the trace context of the tell about to be buffered."""
        if context is None:
            packed = None
        elif context is self._packed_for:  # the tells of one turn share its context
            packed = self._packed
        else:
            packed = trace_wire.pack(context)
            self._packed_for, self._packed = context, packed
        contexts = self._contexts
        if contexts is None:
            if packed is None:
                return
            contexts = self._contexts = [None] * len(self._addresses)
        contexts.append(packed)

    async def wait_for_room(self) -> None:
        """Wait until ``tell_nowait`` may take more (the connection drained, or opened)."""
        connection = await self.connection()
        if connection.paused:
            if connection.room is None:
                connection.room = asyncio.get_running_loop().create_future()
            await asyncio.shield(connection.room)

    def _flush(self) -> None:
        """Write the buffered tells as one frame (called once per loop iteration)."""
        self._flush_handle = None
        addresses, messages, contexts = self._addresses, self._messages, self._contexts
        if not addresses:
            return
        connection = self._connection
        if connection is None or connection.closed:
            return  # sent once connected (or dropped if that fails)
        self._addresses, self._messages, self._contexts = [], [], None
        self._packed_for = self._packed = None  # a turn's context is not kept past its batch
        for first in range(0, len(addresses), 16_384):  # frames well under the size limit
            chunk = slice(first, first + 16_384)
            try:
                body = codec.encode_tells(
                    addresses[chunk], messages[chunk], None if contexts is None else contexts[chunk]
                )
            except AgentdError as exc:  # checked when told: not expected
                self.tells_lost += len(addresses[chunk])
                log.error(
                    "%d tells to node %s could not be encoded: %s",
                    len(addresses[chunk]),
                    self.node,
                    exc,
                )
                continue
            connection.send(TELLS, 0, body)
            self.frames_sent += 1
        self.tells_sent += len(addresses)
        self._observer.forwarded_tells(len(addresses), (len(addresses) + 16_383) // 16_384)

    # -- asks and streams ----------------------------------------------------------------

    async def ask(
        self, address: Address, message: Any, timeout: float | None, *, fresh: bool = False
    ) -> Any:
        """The owner's reply to ``message`` (or its error), within ``timeout`` seconds;
        NotSent when the call could not be sent, Unavailable when the connection is lost
        while waiting."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        codec.check(message)  # before connecting: a message that cannot go fails first
        connection = await self.connection(fresh=fresh)
        call = next(self._ids)
        reply: asyncio.Future[Any] = loop.create_future()
        connection.calls[call] = reply
        self._send_call(connection, ASK, call, address, message, deadline)
        try:
            if deadline is None:
                return await reply
            async with asyncio.timeout_at(deadline):
                return await reply
        except TimeoutError:
            connection.send(CANCEL, call, b"")
            raise DeadlineExceeded(
                f"agent {address} on node {self.node}: no reply within {timeout:g}s"
            ) from None
        except asyncio.CancelledError:
            connection.send(CANCEL, call, b"")
            raise
        finally:
            connection.calls.pop(call, None)

    def _send_call(
        self,
        connection: _ClientConnection,
        kind: int,
        call: int,
        address: Address,
        message: Any,
        deadline: float | None,
    ) -> None:
        if self._addresses:
            self._flush()  # tells told before this call arrive before it
        # The time left, not the timeout: connecting took some of it.
        remaining = None
        if deadline is not None:
            remaining = max(deadline - asyncio.get_running_loop().time(), 1e-6)
        body = codec.encode((address, message, remaining, current_traceparent()))
        connection.send(kind, call, body)

    async def ask_stream(
        self, address: Address, message: Any, timeout: float | None, *, fresh: bool = False
    ) -> AsyncGenerator[Any, None]:
        """The events of a streaming turn on the owner, within ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        codec.check(message)
        connection = await self.connection(fresh=fresh)
        call = next(self._ids)
        events: asyncio.Queue[Any] = asyncio.Queue()
        connection.calls[call] = events
        self._send_call(connection, STREAM, call, address, message, deadline)
        finished = False
        try:
            while True:
                if deadline is None:
                    event = await events.get()
                else:
                    try:
                        async with asyncio.timeout_at(deadline):
                            event = await events.get()
                    except TimeoutError:
                        raise DeadlineExceeded(
                            f"agent {address} on node {self.node}: the stream did not end "
                            f"within {timeout:g}s"
                        ) from None
                if event is _END:
                    finished = True
                    return
                if type(event) is _Failed:
                    finished = True
                    raise _error(event.error)
                yield event
        finally:
            connection.calls.pop(call, None)
            if not finished:
                connection.send(CANCEL, call, b"")

    async def aclose(self) -> None:
        """Close the connection: calls in progress fail with Unavailable, buffered tells
        are lost (counted)."""
        self._closed = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._drop_tells("the peer client closed")
        connecting = self._connecting
        if connecting is not None:
            connecting.cancel()
            with contextlib.suppress(BaseException):
                await connecting
        connection = self._connection
        if connection is not None and connection.transport is not None:
            connection.transport.abort()  # connection_lost fails its calls


def _consume(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()
