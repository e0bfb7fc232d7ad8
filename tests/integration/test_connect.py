"""Connect (JSON and protobuf) over HTTP/1.1 and HTTP/2, with httpx and curl."""

from __future__ import annotations

import contextlib
import json
import shutil
import struct
import subprocess
import zlib

import grpc
import httpx
import pytest

from agentd.v1 import agent_pb2 as pb
from agentd.v1 import agent_pb2_grpc as pb_grpc

INVOKE = "/agentd.v1.AgentService/Invoke"
STREAM = "/agentd.v1.AgentService/InvokeStream"
JSON = {"content-type": "application/json"}


def frame(payload: bytes, flags: int = 0) -> bytes:
    return struct.pack(">BI", flags, len(payload)) + payload


def unframe(body: bytes) -> list[tuple[int, bytes]]:
    frames = []
    while body:
        flags, size = struct.unpack(">BI", body[:5])
        frames.append((flags, body[5 : 5 + size]))
        body = body[5 + size :]
    return frames


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2c"])
def test_invoke_json(server, http2):
    with httpx.Client(base_url=server.url, http1=not http2, http2=http2) as client:
        r = client.post(INVOKE, json={"agent": "echo/j", "message": {"text": "hi"}})
    assert r.status_code == 200, r.text
    assert r.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
    assert r.json() == {"agent": "echo/j", "message": {"text": "hi"}}


def test_invoke_binary_protobuf(http):
    request = pb.InvokeRequest(agent="echo", message=pb.Message(data=b"\x00\xff"))
    r = http.post(
        INVOKE, content=request.SerializeToString(), headers={"content-type": "application/proto"}
    )
    assert r.status_code == 200
    assert pb.InvokeResponse.FromString(r.content).message.data == b"\x00\xff"


def test_json_bytes_as_base64_and_metadata(http):
    r = http.post(
        INVOKE, json={"agent": "echo", "message": {"data": "AAE=", "metadata": {"a": "b"}}}
    )
    assert r.status_code == 200
    assert r.json()["message"] == {"data": "AAE=", "metadata": {"a": "b"}}


def test_stream_connect_json(http):
    body = frame(json.dumps({"agent": "echo", "message": {"text": "a b"}}).encode())
    r = http.post(STREAM, content=body, headers={"content-type": "application/connect+json"})
    assert r.status_code == 200
    frames = unframe(r.content)
    assert [json.loads(p).get("token") for f, p in frames if not f & 2] == ["a ", "b"]
    flags, end = frames[-1]
    assert flags & 2 and "error" not in json.loads(end)


def test_unknown_agent_404(http):
    r = http.post(INVOKE, json={"agent": "ghost", "message": {}})
    assert r.status_code == 404
    assert r.json()["code"] == "not_found"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b'{"agent":', "malformed JSON"),
        (b'{"agent": 5}', "malformed JSON"),
        (b'{"nosuchfield": 1}', "malformed JSON"),
        (b"\xff\xfe", "malformed JSON"),
    ],
)
def test_malformed_json_400_names_parse_error(http, body, fragment):
    r = http.post(INVOKE, content=body, headers=JSON)
    assert r.status_code == 400
    assert r.json()["code"] == "invalid_argument"
    assert fragment in r.json()["message"]


def test_malformed_address_400(http):
    r = http.post(INVOKE, json={"agent": "../etc/passwd"})
    assert r.status_code == 400
    assert "malformed agent address" in r.json()["message"]


def test_body_over_limit_413(http):
    r = http.post(INVOKE, json={"agent": "echo", "message": {"text": "x" * (2 * 1024 * 1024)}})
    assert r.status_code == 413
    assert r.json()["code"] == "resource_exhausted"


def test_chunked_body_over_limit_413(http):
    def chunks():
        for _ in range(40):
            yield b"x" * 65536

    r = http.post(INVOKE, content=chunks(), headers=JSON)
    assert r.status_code == 413


def test_unsupported_content_type_415(http):
    r = http.post(INVOKE, content=b"agent=echo", headers={"content-type": "text/plain"})
    assert r.status_code == 415


def test_connect_timeout_header_deadline(http):
    r = http.post(
        INVOKE,
        json={"agent": "slow/ct", "message": {"text": "5"}},
        headers={"connect-timeout-ms": "200"},
    )
    assert r.status_code == 504
    assert r.json()["code"] == "deadline_exceeded"


def test_agent_error_500_without_stack(http):
    r = http.post(INVOKE, json={"agent": "boom"})
    assert r.status_code == 500
    assert r.json()["code"] == "internal"
    assert "Traceback" not in r.text


def test_unknown_path_404_json(http):
    r = http.get("/nope")
    assert r.status_code == 404
    assert r.json()["code"] == "not_found"


def test_ops_endpoints(http):
    assert http.get("/healthz").text == "ok\n"
    assert http.get("/readyz").status_code == 200
    assert http.post("/healthz").status_code == 405
    index = http.get("/").json()
    assert "agentd.v1.AgentService" in index["services"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("flag", ["--http1.1", "--http2-prior-knowledge"])
def test_curl(server, flag):
    out = subprocess.run(
        [
            "curl",
            "-sS",
            flag,
            "-H",
            "content-type: application/json",
            "-d",
            '{"agent":"echo","message":{"text":"from curl"}}',
            server.url + INVOKE,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert json.loads(out.stdout)["message"]["text"] == "from curl"


def test_grpc_web(http):
    request = pb.InvokeRequest(agent="echo/web", message=pb.Message(text="web"))
    r = http.post(
        INVOKE,
        content=frame(request.SerializeToString()),
        headers={"content-type": "application/grpc-web+proto", "x-grpc-web": "1"},
    )
    assert r.status_code == 200
    frames = unframe(r.content)
    assert pb.InvokeResponse.FromString(frames[0][1]).message.text == "web"
    flags, trailer = frames[-1]
    assert flags & 0x80 and b"grpc-status:0" in trailer.replace(b" ", b"")


def test_grpc_web_error_in_trailer(http):
    request = pb.InvokeRequest(agent="ghost")
    r = http.post(
        INVOKE,
        content=frame(request.SerializeToString()),
        headers={"content-type": "application/grpc-web+proto"},
    )
    status = r.headers.get("grpc-status")
    if status is None:  # trailers in the body
        status = unframe(r.content)[-1][1].split(b"grpc-status:")[1].split(b"\r\n")[0].strip()
    assert int(status) == 5  # NOT_FOUND


def test_metrics_count_requests_errors_and_latency(http):
    from tests.conftest import metric_value

    labels = {"method": INVOKE, "protocol": "connect"}
    before = http.get("/metrics").text
    http.post(INVOKE, json={"agent": "echo"})
    http.post(INVOKE, json={"agent": "ghost"})
    after = http.get("/metrics").text
    ok, missing = "agentd_requests_total", "agentd_request_errors_total"
    assert (
        metric_value(after, ok, code="200", **labels)
        == metric_value(before, ok, code="200", **labels) + 1
    )
    assert (
        metric_value(after, missing, code="404", **labels)
        == metric_value(before, missing, code="404", **labels) + 1
    )
    count = "agentd_request_duration_seconds_count"
    assert metric_value(after, count, **labels) >= metric_value(before, count, **labels) + 2
    assert "agentd_requests_in_flight" in after


def test_server_survives_garbage(server):
    # A raw HTTP/2 preface followed by junk, and a broken HTTP/1.1 request.
    import socket

    for payload in (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff", b"GARBAGE\r\n\r\n"):
        with socket.create_connection((server.host, server.port), timeout=5) as sock:
            sock.sendall(payload)
            with contextlib.suppress(OSError):
                sock.recv(1024)
    assert httpx.get(server.url + "/healthz").status_code == 200


# -- message encodings: identity, gzip and deflate; anything else names the accepted ones ----


def _end_error(body: bytes) -> dict:
    flags, payload = unframe(body)[-1]
    assert flags & 0x02
    return json.loads(payload)["error"]


def test_deflate_is_spoken_on_every_rpc_protocol(http, channel):
    # Connect answered 501 to deflate (and a Connect stream INTERNAL); it is a standard
    # encoding of Connect, gRPC and HTTP alike, as cheap as gzip.
    body = json.dumps({"agent": "echo/z", "message": {"text": "deflated"}}).encode()
    unary = http.post(
        INVOKE,
        content=zlib.compress(body),
        headers={**JSON, "content-encoding": "deflate", "accept-encoding": "deflate"},
    )
    assert unary.status_code == 200 and unary.headers["content-encoding"] == "deflate"
    assert unary.json()["message"]["text"] == "deflated"  # httpx inflates it
    stream = http.post(
        STREAM,
        content=frame(zlib.compress(body), flags=1),
        headers={
            "content-type": "application/connect+json",
            "connect-content-encoding": "deflate",
            "connect-accept-encoding": "deflate",
        },
    )
    assert stream.status_code == 200 and stream.headers["connect-content-encoding"] == "deflate"
    events = [json.loads(zlib.decompress(p)) for f, p in unframe(stream.content) if f == 1]
    assert [e["token"] for e in events] == ["deflated"]
    assert unframe(stream.content)[-1][0] == 3  # the end of the stream, compressed too
    request = pb.InvokeRequest(agent="echo/z", message=pb.Message(text="web")).SerializeToString()
    web = http.post(
        INVOKE,
        content=frame(zlib.compress(request), flags=1),
        headers={"content-type": "application/grpc-web+proto", "grpc-encoding": "deflate"},
    )
    assert pb.InvokeResponse.FromString(unframe(web.content)[0][1]).message.text == "web"
    stub = pb_grpc.AgentServiceStub(channel)
    reply = stub.Invoke(
        pb.InvokeRequest(agent="echo/z", message=pb.Message(text="grpc")),
        compression=grpc.Compression.Deflate,
        timeout=30,
    )
    assert reply.message.text == "grpc"


@pytest.mark.parametrize(
    ("path", "headers", "accept"),
    [
        (INVOKE, {**JSON, "content-encoding": "br"}, "accept-encoding"),
        (
            STREAM,
            {"content-type": "application/connect+json", "connect-content-encoding": "snappy"},
            "connect-accept-encoding",
        ),
    ],
    ids=["connect-unary", "connect-stream"],
)
def test_an_unknown_connect_encoding_is_unimplemented_naming_the_accepted_ones(
    http, path, headers, accept
):
    body = json.dumps({"agent": "echo", "message": {"text": "x"}}).encode()
    response = http.post(
        path, content=frame(body) if "connect+" in str(headers) else body, headers=headers
    )
    assert response.status_code == 501  # Connect's HTTP status for unimplemented
    assert response.json()["code"] == "unimplemented"
    assert response.headers[accept] == "identity, gzip, deflate"


def test_an_unknown_grpc_encoding_is_unimplemented_naming_the_accepted_ones(http):
    request = pb.InvokeRequest(agent="echo").SerializeToString()
    response = http.post(
        INVOKE,
        content=frame(request),
        headers={"content-type": "application/grpc-web+proto", "grpc-encoding": "snappy"},
    )
    assert response.headers["grpc-status"] == "12"  # UNIMPLEMENTED
    assert response.headers["grpc-accept-encoding"] == "identity, gzip, deflate"


def test_a_compressed_flag_without_an_encoding_is_invalid_argument(http):
    # connect-python called both INTERNAL ("sent compressed message without compression").
    body = json.dumps({"agent": "echo", "message": {"text": "x"}}).encode()
    stream = http.post(
        STREAM, content=frame(body, flags=1), headers={"content-type": "application/connect+json"}
    )
    assert _end_error(stream.content)["code"] == "invalid_argument"
    request = pb.InvokeRequest(agent="echo").SerializeToString()
    web = http.post(
        INVOKE,
        content=frame(request, flags=1),
        headers={"content-type": "application/grpc-web+proto"},
    )
    status = web.headers.get("grpc-status")
    if status is None:  # trailers in the body
        status = unframe(web.content)[-1][1].split(b"grpc-status:")[1].split(b"\r\n")[0].strip()
    assert int(status) == 3  # INVALID_ARGUMENT


def test_grpc_without_te_trailers_is_refused_with_a_status_it_can_read(server):
    # The server sends no trailers to a request without "te: trailers", so such a call
    # ended with no gRPC status at all; now it is refused in the headers, where it shows.
    from urllib.parse import unquote

    from tests.security.rawh2 import exchange

    request = pb.InvokeRequest(agent="echo", message=pb.Message(text="x")).SerializeToString()
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", INVOKE),
        (":authority", "test"),
        ("content-type", "application/grpc"),
    ]
    bare, proper = exchange(
        server.host,
        server.port,
        [(headers, frame(request)), ([*headers, ("te", "trailers")], frame(request))],
    )
    assert bare.headers[b"grpc-status"] == b"3"  # INVALID_ARGUMENT
    assert "te: trailers" in unquote(bare.headers[b"grpc-message"].decode())
    assert proper.trailers[b"grpc-status"] == b"0"
    assert pb.InvokeResponse.FromString(unframe(proper.body)[0][1]).message.text == "x"
