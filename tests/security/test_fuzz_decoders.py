"""Fuzzers on every decoder of a live server: client input gets a client error, never a
server error, and leaves no traceback in the server log.

Each fuzzer draws a fixed number of cases from ``random.Random(seed)``: the same cases on
every run, so a failure names its case. Per decoder: Connect JSON (AgentService), gRPC
framing and compression flags (raw HTTP/2 frames), KServe JSON, the KServe binary tensor
extension, KServe gRPC tensors and OpenAI bodies. The answer must be a 4xx (Connect's 501 is
allowed only as its ``unimplemented`` code) or a gRPC status a client can act on
(INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, UNIMPLEMENTED, ...), never 5xx,
INTERNAL or UNKNOWN, and the server keeps answering.

``AGENTD_FUZZ_CASES`` scales the counts (e.g. 10 for a longer hunt than the suite affords)
and ``AGENTD_FUZZ_SEED`` shifts the seeds (other cases, as fixed); the suite runs with
neither.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import random
import struct
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import httpx
import pytest
from tritonclient.grpc import service_pb2

from agentd.gateway.routes import HTTP_ROUTES
from agentd.inference import DataType
from agentd.testing import RunningServer, start_server
from agentd.testing.models import write_identity_model
from agentd.v1 import agent_pb2 as pb
from tests.security.fuzzing import (
    EDGE_DIMS,
    EDGE_INTS,
    edge_shape,
    junk,
    mutate_bytes,
    mutate_doc,
    serialize,
)
from tests.security.rawh2 import exchange

SCALE = float(os.environ.get("AGENTD_FUZZ_CASES", "1"))
SEED = int(os.environ.get("AGENTD_FUZZ_SEED", "0"))
BODY_LIMIT = 64 * 1024  # small, so that the size limits are reached too
IDENTITY_TYPES = ["FP32", "FP16", "INT8", "UINT64", "BOOL", "BYTES"]
# Statuses a client can act on; INTERNAL, UNKNOWN, DATA_LOSS and UNAVAILABLE are not.
CLIENT_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
}
CLIENT_CODE_NUMBERS = {code.value[0] for code in CLIENT_CODES}


def cases(count: int) -> int:
    return max(1, int(count * SCALE))


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    plugins = tmp_path_factory.mktemp("fuzz-plugins")
    for datatype in IDENTITY_TYPES:
        write_identity_model(plugins / "models", f"ident_{datatype.lower()}", DataType(datatype))
    running = start_server(
        ["--plugins", str(plugins)], env={"AGENTD_MAX_BODY_BYTES": str(BODY_LIMIT)}, timeout=60
    )
    yield running
    running.stop()


@pytest.fixture
def http(fuzz_server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fuzz_server.url, timeout=30) as client:
        yield client


@pytest.fixture
def clean_log(fuzz_server: RunningServer) -> Iterator[None]:
    """After the test: nothing in the server log beyond normal lines, and health answers."""
    start = len(fuzz_server.output)
    yield
    assert httpx.get(fuzz_server.url + "/healthz", timeout=30).status_code == 200
    log = "".join(fuzz_server.output[start:])
    for marker in ("Traceback", "ERROR", "never retrieved", "Exception"):
        assert marker not in log, log[-3000:]


def check_http(response: httpx.Response, case: int, what: Any, *, deadline: bool = False) -> None:
    """A 4xx; or Connect's own HTTP status for ``unimplemented`` (501), or a 504 when
    the client set the deadline itself (``deadline``)."""
    if response.status_code < 500:
        return
    code = _json(response).get("code")
    allowed = (response.status_code, code) == (501, "unimplemented") or (
        deadline and response.status_code == 504
    )
    assert allowed, f"case {case}: {response.status_code} {response.text[:300]} for {what!r}"


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def short(data: Any) -> str:
    text = repr(data)
    return text if len(text) < 400 else text[:400] + "..."


# -- Connect JSON (AgentService) -----------------------------------------------------------


AGENT_DOC = {
    "agent": "echo/fuzz",
    "message": {"text": "hello", "data": base64.b64encode(b"\x00\x01").decode(), "metadata": {}},
}
CONNECT_TYPES = [
    "application/json",
    "application/json; charset=utf-8",
    "APPLICATION/JSON",
    "application/json; charset=latin-1",
    "application/proto",
    "application/x-www-form-urlencoded",
]


def connect_case(rng: random.Random) -> tuple[str, bytes, dict[str, str]]:
    path = rng.choice(["Invoke", "Invoke", "Invoke", "InvokeStream", "CallTool", "ListAgents"])
    doc: Any = dict(AGENT_DOC)
    if path == "CallTool":
        doc = {"name": rng.choice(["calc", "nope", ""]), "argumentsJson": '{"expression": "1+2"}'}
    elif path == "ListAgents":
        doc = {}
    body = serialize(rng, mutate_doc(rng, doc) if rng.random() < 0.9 else doc)
    headers = {"content-type": rng.choice(CONNECT_TYPES)}
    if headers["content-type"] == "application/proto":
        request = pb.InvokeRequest(agent="echo/fuzz", message=pb.Message(text="hi"))
        body = mutate_bytes(rng, request.SerializeToString())
    if path == "InvokeStream":
        headers["content-type"] = "application/connect+json"
        size = len(body) + rng.choice([0, 0, 0, -1, 1, 2**31])
        body = struct.pack(">BI", rng.choice([0, 0, 0, 1, 2]), size & 0xFFFFFFFF) + body
    if rng.random() < 0.2:
        headers["connect-timeout-ms"] = rng.choice(["0", "-1", "abc", "99999999999", "1", "5000"])
    if rng.random() < 0.1:
        headers["connect-protocol-version"] = rng.choice(["1", "2", "x"])
    if rng.random() < 0.1:
        encoding = rng.choice(["gzip", "deflate", "br", "GZIP", ""])
        name = "connect-content-encoding" if path == "InvokeStream" else "content-encoding"
        headers[name] = encoding
        if encoding == "gzip" and rng.random() < 0.5:
            body = gzip.compress(body)
    return f"/agentd.v1.AgentService/{path}", body, headers


def test_fuzz_connect_json(http, clean_log):
    rng = random.Random(1201 + SEED)
    for case in range(cases(400)):
        path, body, headers = connect_case(rng)
        response = http.post(path, content=body, headers=headers)
        deadline = "connect-timeout-ms" in headers
        check_http(response, case, (path, headers, short(body)), deadline=deadline)


# -- gRPC framing and compression flags (raw HTTP/2) ----------------------------------------


def _invoke() -> bytes:
    return pb.InvokeRequest(agent="echo/h2", message=pb.Message(text="x")).SerializeToString()


def _model_infer() -> bytes:
    request = service_pb2.ModelInferRequest(model_name="ident_fp32")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(b"\x00" * 16)
    return request.SerializeToString()


GRPC_METHODS: list[tuple[str, Callable[[], bytes]]] = [
    ("/agentd.v1.AgentService/Invoke", _invoke),
    ("/agentd.v1.AgentService/InvokeStream", _invoke),
    ("/agentd.v1.AgentService/ListAgents", lambda: b""),
    ("/agentd.v1.AgentService/CallTool", lambda: b"\x0a\x04calc\x12\x02{}"),
    ("/inference.GRPCInferenceService/ModelInfer", _model_infer),
    ("/inference.GRPCInferenceService/ModelMetadata", lambda: b"\x0a\x0aident_fp32"),
    ("/inference.GRPCInferenceService/ServerLive", lambda: b""),
    ("/grpc.health.v1.Health/Check", lambda: b""),
    ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", lambda: b"\x3a\x00"),
]
GRPC_TYPES = [
    "application/grpc",
    "application/grpc",
    "application/grpc+proto",
    "application/grpc+json",
    "application/grpc-web+proto",
    "application/grpc+nope",
    "application/grpc-web-text",
]
ENCODINGS = [None, None, None, "identity", "gzip", "deflate", "snappy", "", "GZIP"]


def grpc_frame(rng: random.Random, payload: bytes, encoding: str | None) -> bytes:
    flags = 0
    if encoding in ("gzip", "deflate") and rng.random() < 0.6:
        flags = 1
        payload = gzip.compress(payload) if encoding == "gzip" else zlib.compress(payload)
        if rng.random() < 0.2:
            payload = mutate_bytes(rng, payload)
        elif rng.random() < 0.1:  # inflates past the body limit
            big = b"\x00" * (BODY_LIMIT * 4)
            payload = gzip.compress(big) if encoding == "gzip" else zlib.compress(big)
    if rng.random() < 0.15:
        flags = rng.choice([1, 2, 0x80, 0xFF])
    size = len(payload)
    length = rng.choice([size] * 6 + [size + 1, max(size - 1, 0), 0, 0xFFFFFFFF, BODY_LIMIT + 1])
    return struct.pack(">BI", flags, length) + payload


def grpc_case(rng: random.Random) -> tuple[list[tuple[str, str]], bytes]:
    path, make = rng.choice(GRPC_METHODS)
    content_type = rng.choice(GRPC_TYPES)
    encoding = rng.choice(ENCODINGS)
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "fuzz"),
        ("content-type", content_type),
    ]
    if rng.random() < 0.9:
        headers.append(("te", "trailers"))
    if encoding is not None:
        headers.append(("grpc-encoding", encoding))
    if rng.random() < 0.15:
        headers.append(("grpc-timeout", rng.choice(["1S", "0n", "999999999S", "abc", "5", "1H"])))
    frames = []
    for _ in range(rng.choice([0, 1, 1, 1, 2, 3])):
        payload = make()
        if content_type.endswith("+json"):
            payload = serialize(rng, mutate_doc(rng, AGENT_DOC))
        roll = rng.random()
        if roll < 0.3:
            payload = mutate_bytes(rng, payload)
        elif roll < 0.4:
            payload = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
        frames.append(grpc_frame(rng, payload, encoding))
    body = b"".join(frames)
    if body and rng.random() < 0.15:
        body = body[: rng.randrange(len(body))]  # cut inside a frame
    return headers, body


def grpc_web_status(body: bytes) -> int | None:
    """The grpc-status in a gRPC-Web body's trailer frame (flag 0x80)."""
    while len(body) >= 5:
        flags, size = struct.unpack(">BI", body[:5])
        payload, body = body[5 : 5 + size], body[5 + size :]
        if flags & 0x80:
            for line in payload.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"grpc-status":
                    return int(value)
    return None


def test_fuzz_grpc_framing(fuzz_server, clean_log):
    rng = random.Random(1202 + SEED)
    requests = [grpc_case(rng) for _ in range(cases(400))]
    for start in range(0, len(requests), 50):  # a fresh connection now and then
        batch = requests[start : start + 50]
        responses = exchange(fuzz_server.host, fuzz_server.port, batch)
        for offset, ((headers, body), response) in enumerate(zip(batch, responses, strict=True)):
            case = (start + offset, dict(headers), short(body))
            assert response.reset is None, f"stream reset ({response.reset}): {case}"
            assert response.status < 500, f"HTTP {response.status}: {case}"
            content_type = headers[4][1]
            status = response.grpc_status()
            if content_type.startswith("application/grpc-web") and status is None:
                status = grpc_web_status(response.body)
            if response.status == 200 and content_type.startswith("application/grpc"):
                assert status in CLIENT_CODE_NUMBERS, f"grpc-status {status}: {case}"


# -- KServe REST: JSON and the binary extension ----------------------------------------------


def _values(datatype: str, count: int, rng: random.Random) -> list[Any]:
    if datatype == "BYTES":
        return [rng.choice(["", "a", "\u00e9"]) for _ in range(count)]
    if datatype == "BOOL":
        return [rng.random() < 0.5 for _ in range(count)]
    if datatype in ("FP32", "FP16"):
        return [rng.choice([0.0, 1.5, -2.0, 65504.0]) for _ in range(count)]
    return [rng.randrange(0, 100) for _ in range(count)]


def kserve_target(rng: random.Random) -> tuple[str, str, str, int]:
    """(model, input name, datatype, row width): the built-in decision model or an identity
    model per datatype."""
    if rng.random() < 0.25:
        return "decision", "features", "FP32", 16
    datatype = rng.choice(IDENTITY_TYPES)
    return f"ident_{datatype.lower()}", "INPUT0", datatype, 4


def kserve_json_doc(rng: random.Random) -> tuple[str, dict[str, Any]]:
    model, name, datatype, width = kserve_target(rng)
    rows = rng.choice([0, 1, 1, 2, 8, 9])
    tensor: dict[str, Any] = {
        "name": name,
        "datatype": datatype,
        "shape": edge_shape(rng, [rows, width]),
        "data": _values(datatype, rows * width, rng),
    }
    doc: dict[str, Any] = {"id": "fuzz", "inputs": [tensor]}
    if rng.random() < 0.3:
        doc["outputs"] = [{"name": rng.choice(["OUTPUT0", "probabilities", "action", "x"])}]
    if rng.random() < 0.2:
        doc["parameters"] = {rng.choice(["timeout", "binary_data_output"]): junk(rng)}
    return model, doc


def test_fuzz_kserve_json(http, clean_log):
    rng = random.Random(1203 + SEED)
    for case in range(cases(400)):
        model, doc = kserve_json_doc(rng)
        if rng.random() < 0.7:
            doc = mutate_doc(rng, doc)
        body = serialize(rng, doc)
        if rng.random() < 0.05:
            model = rng.choice(["nope", "ident_fp32/versions/9", "a%2Fb"])
        headers = {"content-type": "application/json"}
        if rng.random() < 0.05:
            headers["content-encoding"] = rng.choice(["gzip", "deflate", "zstd"])
            if rng.random() < 0.7:
                body = gzip.compress(body) if headers["content-encoding"] == "gzip" else body
        response = http.post(f"/v2/models/{model}/infer", content=body, headers=headers)
        # A request's own "timeout" parameter may be shorter than any inference: 504.
        check_http(response, case, (model, short(body)), deadline=b'"timeout"' in body)


def _raw(datatype: str, count: int, rng: random.Random) -> bytes:
    if datatype == "BYTES":
        parts = []
        for _ in range(count):
            item = rng.choice([b"", b"a", b"\xff\xfe"])
            size = len(item) if rng.random() < 0.9 else rng.choice(EDGE_INTS) & 0xFFFFFFFF
            parts.append(struct.pack("<I", size) + item)
        return b"".join(parts)
    size = {"FP32": 4, "FP16": 2, "INT8": 1, "UINT64": 8, "BOOL": 1}[datatype] * count
    if datatype == "BOOL":
        return bytes(rng.choice([0, 1, 1, 2, 255]) for _ in range(size))
    return bytes(rng.randrange(256) for _ in range(size))


def test_fuzz_kserve_binary(http, clean_log):
    rng = random.Random(1204 + SEED)
    for case in range(cases(400)):
        model, name, datatype, width = kserve_target(rng)
        rows = rng.choice([0, 1, 1, 2, 8])
        raw = _raw(datatype, rows * width, rng)
        if rng.random() < 0.2:
            raw = mutate_bytes(rng, raw)
        size: Any = len(raw) if rng.random() < 0.8 else rng.choice([*EDGE_INTS, "8", None, 1.5])
        tensor = {
            "name": name,
            "datatype": datatype,
            "shape": edge_shape(rng, [rows, width]),
            "parameters": {"binary_data_size": size},
        }
        doc: dict[str, Any] = {"inputs": [tensor]}
        if rng.random() < 0.4:
            doc["outputs"] = [{"name": "OUTPUT0", "parameters": {"binary_data": junk(rng)}}]
        if rng.random() < 0.3:
            doc = mutate_doc(rng, doc)
        head = serialize(rng, doc, broken=0.05)
        header_length: Any = len(head)
        if rng.random() < 0.2:
            header_length = rng.choice([-1, 0, len(head) + 1, 2**63, "x", len(head) + len(raw)])
        response = http.post(
            f"/v2/models/{model}/infer",
            content=head + raw,
            headers={
                "content-type": "application/octet-stream",
                "inference-header-content-length": str(header_length),
            },
        )
        check_http(response, case, (model, header_length, short(head), short(raw)))


# -- KServe gRPC tensors -------------------------------------------------------------------


CONTENT_FIELDS = [f.name for f in service_pb2.InferTensorContents.DESCRIPTOR.fields]


def _fill_contents(rng: random.Random, contents: Any, datatype: str, count: int) -> None:
    field = {
        "FP32": "fp32_contents",
        "FP16": "fp32_contents",
        "INT8": "int_contents",
        "UINT64": "uint64_contents",
        "BOOL": "bool_contents",
        "BYTES": "bytes_contents",
    }.get(datatype, "fp32_contents")
    if rng.random() < 0.2:
        field = rng.choice(CONTENT_FIELDS)
    count = count if rng.random() < 0.8 else rng.choice([0, 1, count + 1, 300])
    values: list[Any]
    if field == "bool_contents":
        values = [rng.random() < 0.5 for _ in range(count)]
    elif field == "bytes_contents":
        values = [rng.choice([b"", b"a", b"\xff"]) for _ in range(count)]
    elif field in ("fp32_contents", "fp64_contents"):
        values = [rng.choice([0.0, 1e38, -1e38, 65520.0, 1.0]) for _ in range(count)]
    elif field in ("uint_contents", "uint64_contents"):
        limit = 2**32 - 1 if field == "uint_contents" else 2**64 - 1
        values = [rng.choice([0, 1, 255, 256, 70000, limit]) for _ in range(count)]
    else:
        limit = 2**31 - 1 if field == "int_contents" else 2**63 - 1
        values = [rng.choice([0, -1, 127, 128, -129, limit, -limit - 1]) for _ in range(count)]
    getattr(contents, field).extend(values)


def kserve_grpc_case(rng: random.Random) -> bytes:
    model, name, datatype, width = kserve_target(rng)
    request = service_pb2.ModelInferRequest(
        model_name=model if rng.random() < 0.95 else rng.choice(["", "nope", "\u00e9"]),
        model_version=rng.choice(["", "", "", "1", "2", "x"]),
        id="fuzz",
    )
    rows = rng.choice([0, 1, 1, 2, 8, 9])
    use_raw = rng.random() < 0.5
    for index in range(rng.choice([1, 1, 1, 0, 2])):
        tensor = request.inputs.add(
            name=name if index == 0 else rng.choice([name, "other", ""]),
            datatype=datatype if rng.random() < 0.9 else rng.choice(["FP99", "", "fp32", "BF16"]),
        )
        dims = edge_shape(rng, [rows, width])
        tensor.shape.extend(max(min(d, 2**63 - 1), -(2**63)) for d in dims)
        if use_raw:
            raw = _raw(datatype, rows * width, rng)
            request.raw_input_contents.append(mutate_bytes(rng, raw) if rng.random() < 0.2 else raw)
        else:
            _fill_contents(rng, tensor.contents, datatype, rows * width)
        if rng.random() < 0.1:
            tensor.parameters["shared_memory_region"].string_param = "x"
    if rng.random() < 0.2:
        param = request.parameters["timeout"]
        choice = rng.randrange(4)
        if choice == 0:
            param.int64_param = rng.choice([-1, 0, 1, 2**62])
        elif choice == 1:
            param.string_param = "soon"
        elif choice == 2:
            param.bool_param = True
        else:
            param.uint64_param = 2**64 - 1
    if rng.random() < 0.3:
        request.outputs.add(name=rng.choice(["OUTPUT0", "action", "", "x"]))
    data = request.SerializeToString()
    return mutate_bytes(rng, data) if rng.random() < 0.1 else data


def test_fuzz_kserve_grpc_tensors(fuzz_server, clean_log):
    rng = random.Random(1205 + SEED)
    with grpc.insecure_channel(fuzz_server.target) as channel:
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=lambda data: data,
            response_deserializer=lambda data: data,
        )
        for case in range(cases(400)):
            data = kserve_grpc_case(rng)
            compression = rng.choice([None, None, None, grpc.Compression.Gzip])
            try:
                infer(data, timeout=30, compression=compression)
            except grpc.RpcError as exc:
                assert exc.code() in CLIENT_CODES, f"case {case}: {exc.code()} {exc.details()}"


# -- OpenAI bodies -------------------------------------------------------------------------


COMPLETION = {
    "model": "tinylm",
    "prompt": "Once",
    "max_tokens": 2,
    "temperature": 0.5,
    "top_p": 0.9,
    "stop": ["\n"],
    "seed": 3,
    "n": 2,
    "logprobs": 1,
    "presence_penalty": 0.5,
    "frequency_penalty": 0.5,
    "logit_bias": {"5": -100},
    "stream": False,
    "stream_options": {"include_usage": True},
    "user": "fuzz",
}
CHAT = {
    "model": "tinylm",
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ],
    "max_tokens": 2,
    "temperature": 0,
    "logprobs": True,
    "top_logprobs": 2,
    "stream": False,
}


def _bounded(doc: Any) -> Any:
    """Keep a valid request short: a large or missing token budget would run the model to
    its context (seconds per case); invalid budgets are left for the server to refuse."""
    if not isinstance(doc, dict):
        return doc
    for key in ("max_tokens", "max_completion_tokens"):
        value = doc.get(key)
        if type(value) is int and value > 8:
            doc[key] = 4
    if "max_tokens" not in doc and "max_completion_tokens" not in doc:
        doc["max_tokens"] = 4
    return doc


def _streamed(body: bytes) -> bool:
    try:
        sent = json.loads(body)
    except ValueError:
        return False
    return isinstance(sent, dict) and sent.get("stream") is True


def test_fuzz_openai_bodies(http, clean_log):
    rng = random.Random(1206 + SEED)
    for case in range(cases(300)):
        path, base = rng.choice([("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
        doc = dict(base, stream=rng.random() < 0.3)
        doc = _bounded(mutate_doc(rng, doc) if rng.random() < 0.9 else doc)
        body = serialize(rng, doc, broken=0.1)
        headers = {"content-type": "application/json"}
        if rng.random() < 0.05:
            headers["content-encoding"] = rng.choice(["gzip", "br", "deflate"])
        response = http.post(path, content=body, headers=headers)
        check_http(response, case, (path, short(body)))
        if response.status_code == 200 and _streamed(body):
            assert response.text.endswith("data: [DONE]\n\n"), f"case {case}: {response.text}"


# -- routes, methods and paths -------------------------------------------------------------


# Escapes that decode to invalid UTF-8 (``%ff``, overlong, surrogate) and stray "%" are in:
# pyvoy would fail on them before the app (a hang and a traceback); Envoy's configuration
# refuses them in front of it with a 400 (agentd/server/envoy.py, tests/security/
# test_bad_paths.py).
SEGMENTS = [
    "tinylm",
    "decision",
    "ident_fp32",
    "",
    "..",
    "%2e%2e",
    "%00",
    "%zz",
    "%C3%A9",
    "\u00e9",
    "x" * 3000,
    "%ff",
    "%c3%28",
    "caf%e9",
    "%e0%80%af",
    "%ed%a0%80",
    "%f4%90%80%80",
    "%",
]


def route_case(rng: random.Random) -> tuple[str, str]:
    route = rng.choice(HTTP_ROUTES)
    names = SEGMENTS
    if route.template.startswith("/v2/repository/models/"):
        names = SEGMENTS[3:]  # never unload a served model under the other fuzzers
    path = route.path(rng.choice(names), rng.choice(["1", "", "%7f", "-1"]))
    if rng.random() < 0.3:
        parts = path.split("/")
        parts[rng.randrange(len(parts))] = rng.choice(SEGMENTS[3:])
        path = "/".join(parts)
    if rng.random() < 0.2:
        path += rng.choice(["?x=1", "?", "/", "//", "?a=%zz", "#f"])
    method = rng.choice(["GET", "GET", "POST", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"])
    return method, path


def test_fuzz_routes_and_methods(http, clean_log):
    rng = random.Random(1207 + SEED)
    for case in range(cases(300)):
        method, path = route_case(rng)
        body = serialize(rng, junk(rng)) if method in ("POST", "PUT", "PATCH") else None
        response = http.request(method, path, content=body)
        check_http(response, case, (method, path, short(body)))


def test_every_edge_dimension_is_refused_or_served(http, clean_log):
    # The shapes numpy cannot lay out, one by one in every REST decoder (the gRPC one is
    # fuzzed above): each is a 400, never a 500.
    for case, dim in enumerate(EDGE_DIMS):
        shape = [dim, dim, 0]
        doc = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": shape, "data": []}]}
        response = http.post("/v2/models/ident_fp32/infer", json=doc)
        check_http(response, case, shape)
        binary = dict(doc["inputs"][0], parameters={"binary_data_size": 0})
        del binary["data"]
        head = json.dumps({"inputs": [binary]}).encode()
        response = http.post(
            "/v2/models/ident_fp32/infer",
            content=head,
            headers={"inference-header-content-length": str(len(head))},
        )
        check_http(response, case, shape)


def test_the_fuzzed_models_are_served(fuzz_server):
    # A guard on the fixture: the fuzzers reach every identity model, not only 404s.
    index = httpx.post(fuzz_server.url + "/v2/repository/index", timeout=30).json()
    ready = {m["name"] for m in index if m["state"] == "READY"}
    assert {f"ident_{d.lower()}" for d in IDENTITY_TYPES} | {"decision"} <= ready
