"""HEAD on every route of a live server: GET's status and headers, never a body.

A HEAD answer with body bytes corrupts the next response on an HTTP/1.1 keep-alive
connection (the client reads them as its start) and is a protocol error on HTTP/2. The
routes come from the gateway's own table (``agentd.gateway.routes``) and, for RPC methods,
from the server's gRPC reflection: none is picked by hand. Checked over HTTP/1.1 keep-alive
(h11 as the client, which reads leftover body bytes as a broken next response) and over
HTTP/2 with prior knowledge (h2 frames: any DATA on a HEAD stream fails), on a server
without auth and on one with a bearer token, with and without the token.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import h2.config
import h2.connection
import h2.events
import h11
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2 as rpb
from grpc_reflection.v1alpha import reflection_pb2_grpc as rpb_grpc

from agentd.gateway.routes import HTTP_ROUTES
from agentd.testing import RunningServer, start_server
from tests.conftest import PLUGINS

TOKEN = "head-test-token"
OPENAI_MODEL = "tinylm"
KSERVE_MODEL = "decision"
# Bodies that change from one request to the next (counters), so their length does too.
_VOLATILE_LENGTH = {"/metrics"}
_IGNORED_HEADERS = {b"date", b"server", b"x-envoy-upstream-service-time"}


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


@pytest.fixture(scope="module")
def secured() -> Iterator[RunningServer]:
    running = start_server(["--plugins", str(PLUGINS)], env={"AGENTD_AUTH_TOKENS": TOKEN})
    yield running
    running.stop()


def rpc_paths(server: RunningServer, token: str | None) -> list[str]:
    """Every RPC method the server lists through reflection, as ``/service/Method``."""
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(server.target) as channel:
        stub = rpb_grpc.ServerReflectionStub(channel)
        (listed,) = stub.ServerReflectionInfo(
            iter([rpb.ServerReflectionRequest(list_services="")]), metadata=metadata, timeout=30
        )
        services = [s.name for s in listed.list_services_response.service]
        paths = []
        for service in services:
            (found,) = stub.ServerReflectionInfo(
                iter([rpb.ServerReflectionRequest(file_containing_symbol=service)]),
                metadata=metadata,
                timeout=30,
            )
            for raw in found.file_descriptor_response.file_descriptor_proto:
                proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
                package = f"{proto.package}." if proto.package else ""
                for declared in proto.service:
                    if package + declared.name == service:
                        paths += [f"/{service}/{m.name}" for m in declared.method]
    assert len(paths) >= 10 and "/agentd.v1.AgentService/Invoke" in paths
    return paths


def every_path(server: RunningServer, token: str | None) -> list[str]:
    paths = []
    for route in HTTP_ROUTES:
        model = OPENAI_MODEL if route.template.startswith("/v1/") else KSERVE_MODEL
        paths.append(route.path(model))
        if "{model}" in route.template:
            paths.append(route.path("no-such-model", "7"))
    paths += rpc_paths(server, token)
    # Unknown routes of every kind answer too (404 or UNIMPLEMENTED), also without a body.
    paths += ["/no/such/route", "/v2/nope", "/v1/nope", "/agentd.v1.AgentService/NoSuchMethod"]
    return paths


def _headers(pairs) -> list[tuple[bytes, bytes]]:
    return [(bytes(k).lower(), bytes(v)) for k, v in pairs]


# -- HTTP/1.1 keep-alive, h11 as the client ---------------------------------------------------


class Http1:
    """One keep-alive connection; each answer read as h11 frames it."""

    def __init__(self, server: RunningServer) -> None:
        self._sock = socket.create_connection((server.host, server.port), timeout=30)
        self._conn = h11.Connection(h11.CLIENT)

    def close(self) -> None:
        self._sock.close()

    def request(self, method: str, path: str, headers: list[tuple[str, str]]) -> Answer:
        request = h11.Request(method=method, target=path, headers=[("host", "test"), *headers])
        self._sock.sendall(self._conn.send(request) + self._conn.send(h11.EndOfMessage()))
        response, body = None, b""
        while True:
            event = self._conn.next_event()
            if event is h11.NEED_DATA:
                self._conn.receive_data(self._sock.recv(65536))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"unexpected {event!r} answering {method} {path}")
        assert response is not None
        self._conn.start_next_cycle()  # fails if the server did not keep the connection open
        return Answer(response.status_code, _squash(_headers(response.headers)), body)


def _squash(pairs: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    return {k: v for k, v in pairs if k not in _IGNORED_HEADERS}


# -- HTTP/2 with prior knowledge, h2 as the client --------------------------------------------


def http2_exchange(
    server: RunningServer, requests: list[tuple[str, str]], headers: list[tuple[str, str]]
) -> list[Answer]:
    """Send ``(method, path)`` requests on one HTTP/2 connection, a few streams at a time;
    every stream must end cleanly (no reset, no GOAWAY)."""
    sock = socket.create_connection((server.host, server.port), timeout=30)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    answers: list[Answer] = []
    try:
        for start in range(0, len(requests), 8):
            batch = requests[start : start + 8]
            streams: dict[int, list] = {}
            for method, path in batch:
                stream_id = conn.get_next_available_stream_id()
                conn.send_headers(
                    stream_id,
                    [
                        (":method", method),
                        (":path", path),
                        (":scheme", "http"),
                        (":authority", "test"),
                        *headers,
                    ],
                    end_stream=True,
                )
                streams[stream_id] = [None, b"", False]
            sock.sendall(conn.data_to_send())
            while not all(s[2] for s in streams.values()):
                data = sock.recv(65536)
                assert data, "the server closed the HTTP/2 connection"
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        streams[event.stream_id][0] = _headers(event.headers)
                    elif isinstance(event, h2.events.DataReceived):
                        streams[event.stream_id][1] += event.data
                        conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    elif isinstance(event, h2.events.StreamEnded):
                        streams[event.stream_id][2] = True
                    elif isinstance(event, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                        raise AssertionError(f"{event!r} during {batch}")
                sock.sendall(conn.data_to_send())
            for head, body, _ in streams.values():
                pairs = dict(head)
                status = int(pairs.pop(b":status"))
                answers.append(Answer(status, _squash(list(pairs.items())), body))
    finally:
        sock.close()
    return answers


# -- the checks ----------------------------------------------------------------------------


def assert_head_is_get(path: str, head: Answer, get: Answer) -> None:
    assert head.body == b"", f"HEAD {path} answered with a body"
    assert head.status == get.status, path
    if path in _VOLATILE_LENGTH:
        head.headers.pop(b"content-length", None)
        get.headers.pop(b"content-length", None)
    assert head.headers == get.headers, path
    if get.status == 405:
        assert b"allow" in get.headers, f"405 without Allow for {path}"


def check_http1(server: RunningServer, paths: list[str], headers: list[tuple[str, str]]) -> None:
    conn = Http1(server)
    try:
        for path in paths:
            get = conn.request("GET", path, headers)
            # Several HEADs in a row on one connection, then a GET that must be intact.
            heads = [conn.request("HEAD", path, headers) for _ in range(3)]
            for head in heads:
                assert_head_is_get(path, head, get)
            after = conn.request("GET", "/healthz", headers)
            assert (after.status, after.body) == (200, b"ok\n"), f"after HEAD {path}"
    finally:
        conn.close()


def check_http2(server: RunningServer, paths: list[str], headers: list[tuple[str, str]]) -> None:
    requests = []
    for path in paths:
        requests += [("GET", path), ("HEAD", path), ("HEAD", path)]
    requests.append(("GET", "/healthz"))
    answers = http2_exchange(server, requests, headers)
    for index, path in enumerate(paths):
        get, *heads = answers[3 * index : 3 * index + 3]
        for head in heads:
            assert_head_is_get(path, head, get)
    assert (answers[-1].status, answers[-1].body) == (200, b"ok\n")


def test_head_without_auth(server):
    paths = every_path(server, None)
    check_http1(server, paths, [])
    check_http2(server, paths, [])


def test_head_with_auth_configured(secured):
    paths = every_path(secured, TOKEN)
    bearer = [("authorization", f"Bearer {TOKEN}")]
    for headers in ([], bearer):  # without the token: 401s (open routes aside), no bodies
        check_http1(secured, paths, headers)
        check_http2(secured, paths, headers)
    conn = Http1(secured)
    try:
        denied = conn.request("HEAD", "/agentd.v1.AgentService/Invoke", [])
        assert denied.status == 401 and denied.body == b""
        assert denied.headers[b"www-authenticate"].startswith(b"Bearer")
        assert conn.request("HEAD", "/healthz", []).status == 200  # open without a token
    finally:
        conn.close()
