"""The call every gateway benchmark point makes: unary ``Invoke`` of the ``echo`` agent.

Holds the request bytes for both wire formats and one-shot checks that a server answers the
call correctly, made with real clients before any load is sent.
"""

from __future__ import annotations

import http.client
import json
import struct
import time

from agentd.v1 import agent_pb2 as pb
from agentd_bench.errors import BenchError

__all__ = [
    "EXPECTED_AGENT",
    "EXPECTED_TEXT",
    "GRPC_HEADERS",
    "INVOKE_PATH",
    "JSON_BODY",
    "JSON_HEADERS",
    "EchoCheckError",
    "grpc_frame",
    "grpc_reply_frame_len",
    "grpc_request_body",
    "verify_grpc",
    "verify_json",
]

INVOKE_PATH = "/agentd.v1.AgentService/Invoke"
GRPC_HEADERS = {"content-type": "application/grpc", "te": "trailers"}
JSON_HEADERS = {"content-type": "application/json"}
JSON_BODY = b'{"agent":"echo","message":{"text":"hello"}}'
EXPECTED_AGENT = "echo/default"
EXPECTED_TEXT = "hello"


class EchoCheckError(BenchError):
    """A server did not answer the echo call correctly."""


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: flag 0 (not compressed), 4-byte big-endian length."""
    return struct.pack(">BI", 0, len(message)) + message


def grpc_request_body() -> bytes:
    request = pb.InvokeRequest(agent="echo", message=pb.Message(text=EXPECTED_TEXT))
    return grpc_frame(request.SerializeToString())


def grpc_reply_frame_len() -> int:
    """Bytes of one framed echo reply: every server in the comparison sends exactly this."""
    reply = pb.InvokeResponse(agent=EXPECTED_AGENT, message=pb.Message(text=EXPECTED_TEXT))
    return len(grpc_frame(reply.SerializeToString()))


def verify_grpc(port: int, timeout: float = 10.0) -> None:
    """One real grpcio call: the server must answer the echo reply with status OK."""
    import grpc

    from agentd.v1 import agent_pb2_grpc

    end = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        while True:
            try:
                reply = stub.Invoke(
                    pb.InvokeRequest(agent="echo", message=pb.Message(text=EXPECTED_TEXT)),
                    timeout=5,
                )
                break
            except grpc.RpcError as exc:
                # UNAVAILABLE while a server finishes starting; anything else is a real failure.
                if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > end:
                    raise EchoCheckError(
                        f"gRPC check on port {port} failed: {exc.code()}"
                    ) from None
                time.sleep(0.05)
    if reply.agent != EXPECTED_AGENT or reply.message.text != EXPECTED_TEXT:
        raise EchoCheckError(f"gRPC check on port {port}: unexpected reply {reply}")


def verify_json(port: int) -> None:
    """One Connect JSON POST: the server must answer 200 with the echo reply."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", INVOKE_PATH, body=JSON_BODY, headers=JSON_HEADERS)
        response = conn.getresponse()
        raw = response.read()
    except OSError as exc:
        raise EchoCheckError(f"JSON check on port {port} failed: {exc}") from exc
    finally:
        conn.close()
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if (
        response.status != 200
        or not isinstance(data, dict)
        or data.get("agent") != EXPECTED_AGENT
        or (data.get("message") or {}).get("text") != EXPECTED_TEXT
    ):
        raise EchoCheckError(
            f"JSON check on port {port}: status {response.status}, body {raw[:200]!r}"
        )
