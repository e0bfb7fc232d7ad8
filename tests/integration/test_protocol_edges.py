"""Protocol edges on a real server: bad compression, malformed framing and headers, unknown
methods, media type case, ``Allow`` on 405s and clipped error messages.

Raw requests go through a small h2c client (``h2`` over a socket) where grpcio cannot send
what is needed (an empty body, a truncated frame, a malformed ``grpc-timeout``).
"""

from __future__ import annotations

import gzip
import json
import socket
import struct
import zlib
from urllib.parse import unquote

import grpc
import h2.config
import h2.connection
import h2.events
import httpx
import pytest

from agentd.v1 import agent_pb2 as pb
from agentd.v1 import agent_pb2_grpc as pb_grpc

INVOKE = "/agentd.v1.AgentService/Invoke"
STREAM = "/agentd.v1.AgentService/InvokeStream"
REQUEST = pb.InvokeRequest(agent="echo/edges", message=pb.Message(text="hi")).SerializeToString()


def frame(payload: bytes, flags: int = 0) -> bytes:
    return struct.pack(">BI", flags, len(payload)) + payload


def h2_call(
    server, path: str, headers: list[tuple[str, str]], body: bytes = b"", timeout: float = 10
) -> tuple[dict[str, str], bytes, dict[str, str]]:
    """One POST over h2c with prior knowledge: (response headers, body, trailers)."""
    with socket.create_connection((server.host, server.port), timeout=timeout) as sock:
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        conn.send_headers(
            stream,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":authority", server.target),
                (":path", path),
                ("te", "trailers"),
                *headers,
            ],
            end_stream=not body,
        )
        if body:
            conn.send_data(stream, body, end_stream=True)
        sock.sendall(conn.data_to_send())
        response: dict[str, str] = {}
        trailers: dict[str, str] = {}
        data = bytearray()
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                raise AssertionError("connection closed before the stream ended")
            for event in conn.receive_data(chunk):
                if isinstance(event, h2.events.ResponseReceived):
                    response = dict(event.headers)
                elif isinstance(event, h2.events.DataReceived):
                    data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, h2.events.TrailersReceived):
                    trailers = dict(event.headers)
                elif isinstance(event, h2.events.StreamReset):
                    raise AssertionError(f"stream reset with {event.error_code}")
                elif isinstance(event, h2.events.StreamEnded):
                    return response, bytes(data), trailers
            sock.sendall(conn.data_to_send())


def grpc_status(response: dict[str, str], trailers: dict[str, str]) -> tuple[int, str]:
    """grpc-status and grpc-message, from the trailers or a trailers-only response."""
    where = trailers if "grpc-status" in trailers else response
    return int(where["grpc-status"]), unquote(where.get("grpc-message", ""))


def web_trailers(body: bytes) -> dict[str, str]:
    """The trailer frame (flag 0x80) of a gRPC-Web response body."""
    while body:
        flags, size = struct.unpack(">BI", body[:5])
        payload, body = body[5 : 5 + size], body[5 + size :]
        if flags & 0x80:
            lines = payload.decode().split("\r\n")
            return {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
    return {}


def connect_end(body: bytes) -> dict:
    """The end-of-stream message (flag 0x02) of a Connect streaming response."""
    while body:
        flags, size = struct.unpack(">BI", body[:5])
        payload, body = body[5 : 5 + size], body[5 + size :]
        if flags & 0x02:
            return json.loads(payload)
    raise AssertionError("no end-of-stream message")


# -- 1. bad compressed bodies are the client's fault ---------------------------------------


@pytest.mark.parametrize(
    ("path", "doc"),
    [
        (INVOKE, {"agent": "echo"}),
        ("/agentd.v1.AgentService/CallTool", {"name": "calc"}),
        ("/inference.GRPCInferenceService/ServerLive", {}),
        ("/inference.GRPCInferenceService/ModelMetadata", {"name": "decision"}),
    ],
)
@pytest.mark.parametrize("kind", ["not-gzip", "truncated"])
def test_connect_bad_gzip_body_is_400(http, path, doc, kind):
    raw = json.dumps(doc).encode()
    body = raw if kind == "not-gzip" else gzip.compress(raw)[:-6]
    r = http.post(
        path,
        content=body,
        headers={"content-type": "application/json", "content-encoding": "gzip"},
    )
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "invalid_argument"
    assert "malformed gzip body" in r.json()["message"]


def test_connect_good_gzip_body_still_works(http):
    body = gzip.compress(json.dumps({"agent": "echo/gz", "message": {"text": "z"}}).encode())
    r = http.post(
        INVOKE,
        content=body,
        headers={"content-type": "application/json", "content-encoding": "gzip"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["message"] == {"text": "z"}


def test_connect_gzip_bomb_is_refused_not_inflated(http):
    bomb = gzip.compress(b"{" + b" " * (8 * 1024 * 1024) + b"}")
    assert len(bomb) < 64 * 1024
    r = http.post(
        INVOKE,
        content=bomb,
        headers={"content-type": "application/json", "content-encoding": "gzip"},
    )
    assert r.json()["code"] == "resource_exhausted"


def test_grpc_bad_gzip_frame_is_invalid_argument(server):
    response, _, trailers = h2_call(
        server,
        INVOKE,
        [("content-type", "application/grpc"), ("grpc-encoding", "gzip")],
        frame(b"definitely not gzip", flags=1),
    )
    code, message = grpc_status(response, trailers)
    assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "malformed gzip body" in message


def test_grpc_good_gzip_frame_still_works(channel):
    stub = pb_grpc.AgentServiceStub(channel)
    reply = stub.Invoke(
        pb.InvokeRequest(agent="echo/gzip", message=pb.Message(text="x" * 500)),
        compression=grpc.Compression.Gzip,
        timeout=10,
    )
    assert reply.message.text == "x" * 500


def test_grpc_web_bad_gzip_frame_is_invalid_argument(http):
    r = http.post(
        INVOKE,
        content=frame(b"nope", flags=1),
        headers={"content-type": "application/grpc-web+proto", "grpc-encoding": "gzip"},
    )
    trailers = web_trailers(r.content)
    assert trailers["grpc-status"] == "3"
    assert "malformed gzip body" in unquote(trailers["grpc-message"])


def test_connect_stream_bad_gzip_frame_is_invalid_argument(http):
    r = http.post(
        STREAM,
        content=frame(b"nope", flags=1),
        headers={"content-type": "application/connect+proto", "connect-content-encoding": "gzip"},
    )
    error = connect_end(r.content)["error"]
    assert error["code"] == "invalid_argument"
    assert "malformed gzip body" in error["message"]


# -- 3. a malformed grpc-timeout is INVALID_ARGUMENT, in gRPC --------------------------------


@pytest.mark.parametrize("value", ["abc", "99999999999H", "5", "-1S", "1.5S"])
def test_grpc_malformed_timeout_header(server, value):
    response, _, trailers = h2_call(
        server,
        INVOKE,
        [("content-type", "application/grpc"), ("grpc-timeout", value)],
        frame(REQUEST),
    )
    assert response[":status"] == "200"
    code, message = grpc_status(response, trailers)
    assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "grpc-timeout" in message


def test_grpc_well_formed_timeout_header_works(server):
    response, body, trailers = h2_call(
        server,
        INVOKE,
        [("content-type", "application/grpc"), ("grpc-timeout", "5S")],
        frame(REQUEST),
    )
    assert grpc_status(response, trailers)[0] == 0
    assert pb.InvokeResponse.FromString(body[5:]).message.text == "hi"


# -- 4. unknown methods of known services are UNIMPLEMENTED ----------------------------------


@pytest.mark.parametrize(
    "path", ["/agentd.v1.AgentService/Nope", "/inference.GRPCInferenceService/ModelConfig"]
)
def test_unknown_method_grpc_is_unimplemented(server, path):
    response, _, trailers = h2_call(
        server, path, [("content-type", "application/grpc")], frame(b"")
    )
    code, message = grpc_status(response, trailers)
    assert code == grpc.StatusCode.UNIMPLEMENTED.value[0]
    assert "unknown method" in message


def test_unknown_method_grpcio_is_unimplemented(channel):
    call = channel.unary_unary(
        "/agentd.v1.AgentService/Nope",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    with pytest.raises(grpc.RpcError) as caught:
        call(b"", timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_unknown_method_grpc_web_is_unimplemented(http):
    r = http.post(
        "/agentd.v1.AgentService/Nope",
        content=frame(b""),
        headers={"content-type": "application/grpc-web+proto"},
    )
    assert r.status_code == 200
    assert r.headers["grpc-status"] == "12"


def test_unknown_method_connect_is_404_unimplemented(http):
    r = http.post("/agentd.v1.AgentService/Nope", json={})
    assert r.status_code == 404
    assert r.json()["code"] == "unimplemented"


# -- 5. truncated or empty envelopes are INVALID_ARGUMENT ------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        frame(REQUEST)[:-3],  # the message is cut short
        frame(REQUEST)[:3],  # the 5-byte prefix is cut short
        frame(REQUEST) + frame(REQUEST)[:4],  # a whole message, then a partial frame
    ],
    ids=["short-message", "short-prefix", "trailing-partial"],
)
def test_grpc_truncated_frame_is_invalid_argument(server, body):
    response, _, trailers = h2_call(server, INVOKE, [("content-type", "application/grpc")], body)
    code, message = grpc_status(response, trailers)
    assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0], message
    assert "truncated" in message


def test_grpc_empty_unary_body_is_invalid_argument(server):
    response, _, trailers = h2_call(server, INVOKE, [("content-type", "application/grpc")])
    code, message = grpc_status(response, trailers)
    assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "no message" in message


def test_grpc_empty_body_of_a_request_stream_is_fine(server):
    # ServerReflectionInfo takes a stream of requests: none at all is a valid (empty) call.
    response, _, trailers = h2_call(
        server,
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        [("content-type", "application/grpc")],
    )
    assert grpc_status(response, trailers)[0] == 0


def test_grpc_web_truncated_frame_is_invalid_argument(http):
    r = http.post(
        INVOKE,
        content=frame(REQUEST)[:-2],
        headers={"content-type": "application/grpc-web+proto"},
    )
    assert web_trailers(r.content)["grpc-status"] == "3"


@pytest.mark.parametrize("body", [b"", frame(b'{"agent":"echo"}')[:-4]], ids=["empty", "short"])
def test_connect_stream_truncated_or_empty_is_invalid_argument(http, body):
    r = http.post(STREAM, content=body, headers={"content-type": "application/connect+json"})
    assert connect_end(r.content)["error"]["code"] == "invalid_argument"


# -- 6. 405 answers say what is allowed -------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("POST", "/healthz", "GET, HEAD"),
        ("POST", "/metrics", "GET, HEAD"),
        ("DELETE", "/v1/tools", "GET, HEAD"),
        ("POST", "/v1/models", "GET, HEAD"),
        ("GET", "/v1/completions", "POST"),
        ("GET", "/v1/chat/completions", "POST"),
    ],
)
def test_405_carries_allow(http, method, path, allow):
    r = http.request(method, path)
    assert r.status_code == 405
    assert r.headers["allow"] == allow


# -- 7. echoed client values are clipped ------------------------------------------------------


def test_long_agent_address_is_clipped_in_the_error(http):
    r = http.post(INVOKE, json={"agent": "x" * 500_000 + "/../"})
    assert r.status_code == 400
    message = r.json()["message"]
    assert "malformed agent address" in message and "\u2026" in message
    assert len(message) < 300


def test_long_agent_address_is_clipped_over_grpc(channel):
    stub = pb_grpc.AgentServiceStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Invoke(pb.InvokeRequest(agent="Q" * 200_000), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(caught.value.details()) < 300


# -- 8. media types are case-insensitive ------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "content_type", "body"),
    [
        (INVOKE, "APPLICATION/JSON", b'{"agent":"echo/case","message":{"text":"a"}}'),
        (INVOKE, "Application/Json; Charset=UTF-8", b'{"agent":"echo/case"}'),
        ("/agentd.v1.AgentService/ListAgents", "Application/JSON", b"{}"),
        (INVOKE, "APPLICATION/PROTO", REQUEST),
    ],
)
def test_connect_content_type_is_case_insensitive(http, path, content_type, body):
    r = http.post(path, content=body, headers={"content-type": content_type})
    assert r.status_code == 200, r.text


def test_grpc_content_type_is_case_insensitive(server):
    response, body, trailers = h2_call(
        server, INVOKE, [("content-type", "Application/GRPC+Proto")], frame(REQUEST)
    )
    assert grpc_status(response, trailers)[0] == 0
    assert pb.InvokeResponse.FromString(body[5:]).agent == "echo/edges"


# -- 2. the OpenAI routes honour Content-Encoding ---------------------------------------------

COMPLETION = {"model": "tinylm", "prompt": "hi", "max_tokens": 2, "temperature": 0}


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "GZIP"])
def test_openai_compressed_body_is_inflated(http, encoding):
    raw = json.dumps(COMPLETION).encode()
    body = gzip.compress(raw) if encoding.lower() == "gzip" else zlib.compress(raw)
    r = http.post(
        "/v1/completions",
        content=body,
        headers={"content-type": "application/json", "content-encoding": encoding},
    )
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "text_completion"


def test_openai_unsupported_encoding_is_415(http):
    r = http.post(
        "/v1/completions",
        content=json.dumps(COMPLETION).encode(),
        headers={"content-type": "application/json", "content-encoding": "br"},
    )
    assert r.status_code == 415
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and "Content-Encoding" in error["message"]


def test_openai_malformed_gzip_is_400_and_bomb_is_413(http):
    r = http.post(
        "/v1/chat/completions",
        content=b"not gzip",
        headers={"content-type": "application/json", "content-encoding": "gzip"},
    )
    assert r.status_code == 400
    assert "malformed gzip body" in r.json()["error"]["message"]
    r = http.post(
        "/v1/chat/completions",
        content=gzip.compress(b" " * (4 * 1024 * 1024)),
        headers={"content-type": "application/json", "content-encoding": "gzip"},
    )
    assert r.status_code == 413
    assert "limit" in r.json()["error"]["message"]


def test_server_still_healthy_after_the_edges(server):
    with httpx.Client(base_url=server.url, timeout=10) as client:
        assert client.get("/healthz").text == "ok\n"
