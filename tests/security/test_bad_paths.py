"""Request paths whose percent-escapes do not decode to UTF-8, against a live server.

pyvoy decodes the path before the app is called and fails on invalid UTF-8: the request hung
until the client gave up and each one logged a traceback. Envoy now refuses such paths in
front of pyvoy (agentd/server/envoy.py): 400 with a JSON error, or INVALID_ARGUMENT for gRPC
and gRPC-Web, quickly, over HTTP/1.1, HTTP/2, TLS and HTTP/3, with nothing in the log and
the connection kept; valid escapes and query strings route as before.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import random
import re
import ssl
import struct
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2

from agentd.server.envoy import PATH_PATTERN
from agentd.testing import RunningServer, start_server
from agentd.testing.certs import make_test_certs
from tests.integration.h3client import h3_request
from tests.security.rawh2 import exchange

ANSWER_S = 10.0  # a refused path is answered at once; before the fix it hung past this
MESSAGE = "the request path must be ASCII with complete percent-escapes that decode to UTF-8"

# Escapes that are not UTF-8: invalid bytes, truncated, overlong, surrogates, past U+10FFFF.
BAD_ESCAPES = [
    "%ff",
    "%FE",
    "%c3%28",
    "%C3",
    "%a9",
    "%c0%af",
    "%e0%80%80",
    "%ed%a0%80",
    "%f4%90%80%80",
    "%f8%88%80%80%80",
    "%e2%82",
    "caf%e9",
]
# A "%" that starts no escape: pyvoy keeps it, so "%%ff" decodes to 0xff; refused as well.
STRAY_PERCENT = ["%", "%zz", "%f", "%%ff", "50%"]
BAD_PATHS = [
    *(f"/v1/models/{escape}" for escape in BAD_ESCAPES),
    "/healthz/%ff",
    "/v2/models/%ff/infer",
    "/v2/models/ident%c3/ready?x=1",
    "/%ff",
    "/v1/chat/completions%ff",
    *(f"/v1/models/{stray}" for stray in STRAY_PERCENT),
]
GRPC_METHOD = "/agentd.v1.AgentService/%c3%28"


@pytest.fixture
def clean_log(server: RunningServer) -> Iterator[None]:
    """After the test: no traceback or error in the server log, and health answers."""
    start = len(server.output)
    yield
    assert httpx.get(server.url + "/healthz", timeout=ANSWER_S).status_code == 200
    log = "".join(server.output[start:])
    for marker in ("Traceback", "UnicodeDecodeError", "ERROR", "Exception"):
        assert marker not in log, log[-3000:]


def assert_refused(response: httpx.Response, what: str) -> None:
    assert response.status_code == 400, (what, response.status_code, response.text)
    assert response.headers["content-type"] == "application/json", what
    assert response.json() == {"code": "invalid_argument", "message": MESSAGE}, what


def _decodes(path: str) -> bool:
    """What pyvoy accepts, in the terms of the pattern: the part before "?" has only
    complete escapes (a stray "%" is refused too) and decodes to UTF-8."""
    before = path.partition("?")[0]
    if re.search(r"%(?![0-9A-Fa-f]{2})", before):
        return False
    try:
        urllib.parse.unquote_to_bytes(before).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _routed(path: str) -> bool:
    """Whether Envoy routes ``path`` as before: the pattern matches it without its query
    string, as a route's safe_regex does."""
    return re.match(PATH_PATTERN, path.partition("?")[0]) is not None  # RE2 syntax, read alike


def test_the_pattern_accepts_exactly_the_paths_that_decode_to_utf8():
    # Every one- and two-byte escape sequence, in both cases of hex digits.
    for first in range(256):
        for second in range(256):
            for path in (f"/a%{first:02x}%{second:02X}b", f"/%{first:02X}%{second:02x}"):
                assert _routed(path) == _decodes(path), path
    # Longer sequences, weighted towards the bytes that start and continue UTF-8.
    rng = random.Random(20261203)
    interesting = [*range(0x00, 0x80, 7), *range(0x80, 0x100)]
    for _ in range(50_000):
        escapes = "".join(
            f"%{rng.choice(interesting):02x}" for _ in range(rng.choice([3, 4, 5, 6]))
        )
        path = "/" + rng.choice(["", "x", "%"]) + escapes + rng.choice(["", "y", "%", "?%ff"])
        assert _routed(path) == _decodes(path), path
    for good in ["/", "/v1/models/a%20b", "/v1/models/%c3%a9", "/%f0%9f%98%80", "/q?%ff=%zz%"]:
        assert _routed(good), good
    for bad in ["/a\u00e9", "/a b", "/a\x7f", "/a\x00"]:
        assert not _routed(bad), repr(bad)  # not printable ASCII


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2c"])
def test_bad_escapes_get_400_quickly(server, clean_log, http2):
    with httpx.Client(
        base_url=server.url, http1=not http2, http2=http2, timeout=ANSWER_S
    ) as client:
        for path in BAD_PATHS:
            for method in ("GET", "POST"):
                started = time.monotonic()
                response = client.request(method, path, content=b"{}" if method == "POST" else None)
                assert time.monotonic() - started < ANSWER_S / 2, path
                assert_refused(response, f"{method} {path}")
                assert response.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
        head = client.head("/v1/models/%ff")
        assert head.status_code == 400 and head.content == b""
        # The same connection keeps serving.
        assert client.get("/healthz").status_code == 200


def test_http11_keep_alive_connection_survives_refusals(server, clean_log):
    connection = http.client.HTTPConnection(server.host, server.port, timeout=ANSWER_S)
    try:
        sockets = set()
        for path in [*BAD_PATHS, "/healthz"]:
            connection.request("GET", path)
            sockets.add(connection.sock)
            response = connection.getresponse()
            body = response.read()
            if path == "/healthz":
                assert response.status == 200, body
            else:
                assert response.status == 400, (path, body)
                assert json.loads(body)["code"] == "invalid_argument"
        assert len(sockets) == 1  # one connection throughout (http.client would reconnect)
    finally:
        connection.close()


def test_connect_rpc_with_a_bad_method_name(server, clean_log):
    response = httpx.post(
        server.url + GRPC_METHOD,
        json={"agent": "echo", "message": {"text": "hi"}},
        timeout=ANSWER_S,
    )
    assert_refused(response, GRPC_METHOD)


def test_grpc_method_with_a_bad_escape_gets_invalid_argument(server, channel, clean_log):
    for method in [GRPC_METHOD, "/agentd.v1.AgentService/Invoke%ff", "/grpc.health.v1.%e0%80"]:
        call = channel.unary_unary(method)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as raised:
            call(b"", timeout=ANSWER_S)
        assert time.monotonic() - started < ANSWER_S / 2, method
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, raised.value)
        assert raised.value.details() == MESSAGE
    # The channel keeps working.
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    answer = check(health_pb2.HealthCheckRequest(), timeout=ANSWER_S)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def _h2(path: bytes, content_type: bytes | None = None) -> tuple[list, bytes]:
    """A gRPC call (an empty message) with ``content_type``, else a GET."""
    method = b"GET" if content_type is None else b"POST"
    headers = [(b":method", method), (b":scheme", b"http"), (b":authority", b"agentd")]
    headers.append((b":path", path))
    if content_type is None:
        return headers, b""
    return [*headers, (b"content-type", content_type), (b"te", b"trailers")], b"\x00" * 5


def grpc_web_trailers(body: bytes) -> tuple[int, bytes]:
    """grpc-status and grpc-message of a gRPC-Web body that holds only its trailer frame."""
    flags, size = struct.unpack(">BI", body[:5])
    assert flags == 0x80 and len(body) == 5 + size, body
    trailers = dict(line.split(b":", 1) for line in body[5:].split(b"\r\n") if line)
    return int(trailers[b"grpc-status"]), trailers[b"grpc-message"]


def test_grpc_web_and_raw_bytes_over_http2(server, clean_log):
    requests = [
        _h2(GRPC_METHOD.encode(), b"application/grpc"),
        _h2(GRPC_METHOD.encode(), b"application/grpc+proto"),
        _h2(GRPC_METHOD.encode(), b"application/grpc-web+proto"),
        _h2(GRPC_METHOD.encode(), b"application/grpc-web-text"),
        # Raw bytes that are not UTF-8 in :path: HTTP/1.1 refuses them in Envoy's parser,
        # HTTP/2 let them through to pyvoy.
        _h2(b"/v1/models/\xff"),
        _h2(b"/v1/models/\xc3\x28"),
        _h2(b"/v1/models/\xed\xa0\x80"),
        _h2(b"/v1/models/\xe0\x80\x80", b"application/grpc"),
        _h2(b"/healthz"),
    ]
    responses = exchange(server.host, server.port, requests, timeout=ANSWER_S)
    for (headers, _), response in zip(requests[:8], responses, strict=False):
        what = dict(headers)
        assert response.reset is None, what
        content_type = dict(headers).get(b"content-type")
        if content_type is None:
            assert response.status == 400, what
            assert json.loads(response.body)["code"] == "invalid_argument", what
        else:
            assert response.status == 200, what
            if b"grpc-web" in content_type:
                body = response.body
                family = content_type.split(b"+")[0]
                if family.endswith(b"-text"):
                    body = base64.b64decode(body)
                status, message = grpc_web_trailers(body)
            else:
                family = b"application/grpc"
                status, message = response.grpc_status(), response.headers[b"grpc-message"]
                assert response.body == b"", what
            assert response.headers[b"content-type"] == family, what
            assert status == grpc.StatusCode.INVALID_ARGUMENT.value[0], what
            assert urllib.parse.unquote(message.decode()) == MESSAGE, what
    assert responses[-1].status == 200


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2c"])
def test_valid_escapes_route_as_before(server, clean_log, http2):
    with httpx.Client(
        base_url=server.url, http1=not http2, http2=http2, timeout=ANSWER_S
    ) as client:
        # Escaped letters are decoded before routing: this is /healthz.
        assert client.get("/%68ealthz").status_code == 200
        # The query string reaches the app as bytes, escapes or not.
        for query in ["?x=%ff", "?x=%zz&y=%", "?%c3%28"]:
            assert client.get("/healthz" + query).status_code == 200, query
        # Valid escapes reach the app, which answers for itself (decoded in its message).
        for escaped, decoded in [
            ("a%20b", "a b"),
            ("%c3%a9", "\u00e9"),
            ("%f0%9f%98%80", "\U0001f600"),
        ]:
            response = client.get(f"/v1/models/{escaped}")
            assert response.status_code == 404, escaped
            assert response.json()["error"]["code"] == "model_not_found"
            assert decoded in response.json()["error"]["message"]
        # A known model by an escaped name.
        assert client.get("/v2/models/%64ecision/ready").status_code == 200


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Path]]:
    certs = make_test_certs(tmp_path_factory.mktemp("certs"))
    running = start_server(
        ["--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key), "--http3"],
        env={"AGENTD_HEALTH_PORT": "0"},
    )
    yield running, certs.ca_cert
    running.stop()


def test_every_listener_refuses_bad_paths(tls_server):
    server, ca_cert = tls_server
    start = len(server.output)
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca_cert)), http2=True) as tls:
        response = tls.get(server.url + "/v1/models/%ff", timeout=ANSWER_S)
        assert response.http_version == "HTTP/2"
        assert_refused(response, "TLS")
        assert tls.get(server.url + "/v1/models/%c3%a9", timeout=ANSWER_S).status_code == 404
    status, _, body = asyncio.run(
        asyncio.wait_for(
            h3_request(server.host, server.port, ca_cert, "GET", "/v1/models/%ff"), ANSWER_S
        )
    )
    assert (status, json.loads(body)["code"]) == (400, "invalid_argument"), body
    # The health port serves only health paths: a bad one is refused there too, at once.
    match = re.search(r"health checks: http://\S+?:(\d+)/healthz", server.log())
    assert match is not None, server.log()
    health = f"http://{server.host}:{match[1]}"
    assert httpx.get(health + "/healthz/%ff", timeout=ANSWER_S).status_code in (400, 403)
    assert httpx.get(health + "/healthz", timeout=ANSWER_S).status_code == 200
    log = "".join(server.output[start:])
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
