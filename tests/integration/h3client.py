"""A minimal HTTP/3 client on aioquic, for testing the QUIC listener."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent


class _H3Protocol(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.responses: dict[int, tuple[list[H3Event], asyncio.Future[None]]] = {}

    def quic_event_received(self, event: QuicEvent) -> None:
        for h3_event in self.h3.handle_event(event):
            stream_id = getattr(h3_event, "stream_id", None)
            if stream_id in self.responses:
                events, done = self.responses[stream_id]
                events.append(h3_event)
                if getattr(h3_event, "stream_ended", False) and not done.done():
                    done.set_result(None)

    async def request(
        self,
        method: str,
        authority: str,
        path: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> tuple[int, dict[bytes, bytes], bytes]:
        stream_id = self._quic.get_next_available_stream_id()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        events: list[H3Event] = []
        self.responses[stream_id] = (events, done)
        self.h3.send_headers(
            stream_id,
            [
                (b":method", method.encode()),
                (b":scheme", b"https"),
                (b":authority", authority.encode()),
                (b":path", path.encode()),
                *headers,
            ],
            end_stream=not body,
        )
        if body:
            self.h3.send_data(stream_id, body, end_stream=True)
        self.transmit()
        await asyncio.wait_for(done, 10)
        response_headers: dict[bytes, bytes] = {}
        data = b""
        for event in events:
            if isinstance(event, HeadersReceived):
                response_headers.update(event.headers)
            elif isinstance(event, DataReceived):
                data += event.data
        return int(response_headers[b":status"]), response_headers, data


async def h3_request(
    host: str,
    port: int,
    ca_file: Path,
    method: str,
    path: str,
    headers: list[tuple[bytes, bytes]] = (),
    body: bytes = b"",  # type: ignore[assignment]
) -> tuple[int, dict[bytes, bytes], bytes]:
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN)
    config.load_verify_locations(str(ca_file))
    config.verify_mode = ssl.CERT_REQUIRED
    async with connect(host, port, configuration=config, create_protocol=_H3Protocol) as client:
        assert isinstance(client, _H3Protocol)
        return await client.request(method, f"{host}:{port}", path, list(headers), body)
