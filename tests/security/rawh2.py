"""A small HTTP/2 client over the h2 library, for requests no stock client sends: gRPC with
broken framing, odd flags and encodings. It reads the response headers, body and trailers of
each stream, and notes resets and GOAWAY instead of hiding them.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions

__all__ = ["H2Response", "exchange"]


@dataclass
class H2Response:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytes = b""
    trailers: dict[bytes, bytes] = field(default_factory=dict)
    reset: int | None = None  # the RST_STREAM error code, if the server reset the stream
    ended: bool = False

    @property
    def status(self) -> int:
        return int(self.headers.get(b":status", b"0"))

    def grpc_status(self) -> int | None:
        """From the trailers, or the headers of a trailers-only response."""
        raw = self.trailers.get(b"grpc-status", self.headers.get(b"grpc-status"))
        return None if raw is None else int(raw)


def exchange(
    host: str,
    port: int,
    requests: list[tuple[list[tuple[str, str]], bytes]],
    *,
    concurrent: int = 8,
    timeout: float = 30.0,
) -> list[H2Response]:
    """Send ``(headers, body)`` requests on one prior-knowledge HTTP/2 connection, a few
    streams at a time, honouring flow control; one response per request, in order.

    Raises AssertionError when the server ends the whole connection (GOAWAY) or closes it.
    """
    sock = socket.create_connection((host, port), timeout=timeout)
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    responses: list[H2Response] = []
    try:
        for start in range(0, len(requests), concurrent):
            responses += _batch(sock, conn, requests[start : start + concurrent])
    finally:
        sock.close()
    return responses


def _batch(
    sock: socket.socket,
    conn: h2.connection.H2Connection,
    batch: list[tuple[list[tuple[str, str]], bytes]],
) -> list[H2Response]:
    streams: dict[int, H2Response] = {}
    pending: dict[int, bytes] = {}
    for headers, body in batch:
        stream_id = conn.get_next_available_stream_id()
        conn.send_headers(stream_id, headers, end_stream=not body)
        streams[stream_id] = H2Response()
        if body:
            pending[stream_id] = body
    while True:
        _send_pending(conn, pending, streams)
        sock.sendall(conn.data_to_send())
        if all(r.ended or r.reset is not None for r in streams.values()):
            return list(streams.values())
        data = sock.recv(65536)
        assert data, "the server closed the HTTP/2 connection"
        for event in conn.receive_data(data):
            response = streams.get(getattr(event, "stream_id", 0) or 0)
            if isinstance(event, h2.events.ResponseReceived):
                response.headers = dict(event.headers)  # type: ignore[union-attr]
            elif isinstance(event, h2.events.DataReceived):
                response.body += event.data  # type: ignore[union-attr]
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.TrailersReceived):
                response.trailers = dict(event.headers)  # type: ignore[union-attr]
            elif isinstance(event, h2.events.StreamEnded):
                response.ended = True  # type: ignore[union-attr]
            elif isinstance(event, h2.events.StreamReset) and response is not None:
                response.reset = event.error_code
                pending.pop(event.stream_id, None)
            elif isinstance(event, h2.events.ConnectionTerminated):
                raise AssertionError(f"the server ended the connection: {event!r}")


def _send_pending(
    conn: h2.connection.H2Connection, pending: dict[int, bytes], streams: dict[int, H2Response]
) -> None:
    for stream_id in list(pending):
        data = pending[stream_id]
        if streams[stream_id].reset is not None or streams[stream_id].ended:
            del pending[stream_id]
            continue
        room = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)
        if room <= 0:
            continue
        chunk, rest = data[:room], data[room:]
        try:
            conn.send_data(stream_id, chunk, end_stream=not rest)
        except h2.exceptions.StreamClosedError:
            del pending[stream_id]
            continue
        if rest:
            pending[stream_id] = rest
        else:
            del pending[stream_id]
