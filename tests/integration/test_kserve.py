"""KServe v2 (REST and gRPC) end to end with the stock tritonclient, against ``agentd serve``.

The server loads one Identity ONNX model per datatype from a plugins folder made here, plus
the built-in ``decision`` model. Results are compared with a direct onnxruntime run of the
same model files.

agentd's own ``inference`` protobuf module is never imported in this process: tritonclient
registers the same proto package, and two copies cannot live in one interpreter. Raw gRPC
requests are built with tritonclient's ``service_pb2`` instead.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from onnx import TensorProto, helper
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from agentd.testing import RunningServer, start_server

# KServe datatype -> (ONNX element type, numpy dtype)
DATATYPES: dict[str, tuple[int, Any]] = {
    "BOOL": (TensorProto.BOOL, np.bool_),
    "UINT8": (TensorProto.UINT8, np.uint8),
    "UINT16": (TensorProto.UINT16, np.uint16),
    "UINT32": (TensorProto.UINT32, np.uint32),
    "UINT64": (TensorProto.UINT64, np.uint64),
    "INT8": (TensorProto.INT8, np.int8),
    "INT16": (TensorProto.INT16, np.int16),
    "INT32": (TensorProto.INT32, np.int32),
    "INT64": (TensorProto.INT64, np.int64),
    "FP16": (TensorProto.FLOAT16, np.float16),
    "FP32": (TensorProto.FLOAT, np.float32),
    "FP64": (TensorProto.DOUBLE, np.float64),
    "BYTES": (TensorProto.STRING, np.object_),
}
DECISION = Path(str(importlib.resources.files("agentd.models") / "decision" / "model.onnx"))


def model_name(datatype: str) -> str:
    return f"ident_{datatype.lower()}"


def write_identity_model(folder: Path, datatype: str, name: str | None = None) -> None:
    """``models/ident_<type>/`` (or ``name``): OUTPUT0 = Identity(INPUT0), shape [batch, 4]."""
    elem, _ = DATATYPES[datatype]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        f"identity_{datatype.lower()}",
        [helper.make_tensor_value_info("INPUT0", elem, ["batch", 4])],
        [helper.make_tensor_value_info("OUTPUT0", elem, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # old enough for any onnxruntime this project supports
    onnx.checker.check_model(model)
    name = name or model_name(datatype)
    target = folder / "models" / name
    target.mkdir(parents=True)
    onnx.save(model, target / "model.onnx")
    (target / "config.yaml").write_text(
        f"name: {name}\n"
        'version: "1"\n'
        "platform: onnxruntime\n"
        "max_batch_size: 8\n"
        "dynamic_batching: {max_queue_delay_us: 500, max_queue_size: 1024}\n"
        f"inputs:  [{{name: INPUT0, datatype: {datatype}, shape: [4]}}]\n"
        f"outputs: [{{name: OUTPUT0, datatype: {datatype}, shape: [4]}}]\n"
    )


@pytest.fixture(scope="module")
def plugins_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    plugins = tmp_path_factory.mktemp("kserve-plugins")
    (plugins / "agents").mkdir()
    for datatype in DATATYPES:
        write_identity_model(plugins, datatype)
    # Models that fail to load, for the errors clients see (they must name no server path).
    broken = plugins / "models" / "broken"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"not a model")
    write_identity_model(plugins, "FP32", name="misnamed")
    config = plugins / "models" / "misnamed" / "config.yaml"
    config.write_text(config.read_text().replace("name: misnamed", "name: other"))
    write_identity_model(plugins, "FP32", name="reloadable")
    return plugins


@pytest.fixture(scope="module")
def kserve_server(plugins_dir: Path) -> Iterator[RunningServer]:
    running = start_server(["--plugins", str(plugins_dir)], timeout=60)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def http_client(kserve_server: RunningServer) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(url=kserve_server.target, network_timeout=30)
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc_client(kserve_server: RunningServer) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(url=kserve_server.target)
    yield client
    client.close()


@pytest.fixture(scope="module")
def raw_http(kserve_server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=kserve_server.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def channel(kserve_server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(kserve_server.target) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.Channel) -> service_pb2_grpc.GRPCInferenceServiceStub:
    return service_pb2_grpc.GRPCInferenceServiceStub(channel)


def sample(datatype: str, rows: int = 3) -> np.ndarray:
    """Values at the edges of the type's range (BYTES: UTF-8 text, as ONNX strings need)."""
    _, dtype = DATATYPES[datatype]
    count = rows * 4
    if datatype == "BYTES":
        words = [b"", b"a", "\u00e9t\u00e9".encode(), b"hello world", b"x" * 100]
        out = np.empty(count, dtype=object)
        out[:] = [words[i % len(words)] for i in range(count)]
        return out.reshape(rows, 4)
    if datatype == "BOOL":
        return (np.arange(count) % 3 == 0).reshape(rows, 4)
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        edges = [info.min, info.max, 0, 1, info.max // 7]
    else:
        info = np.finfo(dtype)
        edges = [info.max, info.min, 0.0, -1.5, 0.1, info.tiny]
    return np.array([edges[i % len(edges)] for i in range(count)], dtype=dtype).reshape(rows, 4)


def onnxruntime_run(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def expected_identity(plugins: Path, datatype: str, data: np.ndarray) -> np.ndarray:
    path = plugins / "models" / model_name(datatype) / "model.onnx"
    if datatype == "BYTES":
        # ONNX string tensors are text; the server converts to and from UTF-8 bytes.
        text = np.array([b.decode() for b in data.reshape(-1)], dtype=object).reshape(data.shape)
        out = onnxruntime_run(path, {"INPUT0": text})["OUTPUT0"]
        return np.array([s.encode() for s in out.reshape(-1)], dtype=object).reshape(out.shape)
    return onnxruntime_run(path, {"INPUT0": data})["OUTPUT0"]


def assert_equal_tensor(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    if want.dtype == object:
        as_bytes = [v.encode() if isinstance(v, str) else bytes(v) for v in got.reshape(-1)]
        assert as_bytes == list(want.reshape(-1))
    else:
        assert got.dtype == want.dtype
        assert np.array_equal(got, want)


def assert_healthy(http_client: httpclient.InferenceServerClient) -> None:
    """The server still answers, and a good inference still works."""
    assert http_client.is_server_live()
    data = np.ones((1, 4), dtype=np.float32)
    request = httpclient.InferInput("INPUT0", [1, 4], "FP32")
    request.set_data_from_numpy(data)
    result = http_client.infer("ident_fp32", [request])
    assert np.array_equal(result.as_numpy("OUTPUT0"), data)


# -- server and model metadata ---------------------------------------------------------


def test_http_health_and_server_metadata(http_client) -> None:
    assert http_client.is_server_live()
    assert http_client.is_server_ready()
    metadata = http_client.get_server_metadata()
    assert metadata["name"] and "version" in metadata
    assert isinstance(metadata["extensions"], list)


def test_grpc_health_and_server_metadata(grpc_client) -> None:
    assert grpc_client.is_server_live()
    assert grpc_client.is_server_ready()
    metadata = grpc_client.get_server_metadata(as_json=True)
    assert metadata["name"]


@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_model_metadata_both_protocols(http_client, grpc_client, datatype: str) -> None:
    name = model_name(datatype)
    want_tensor = {"datatype": datatype, "shape": [-1, 4]}
    http_meta = http_client.get_model_metadata(name)
    assert http_meta["name"] == name
    assert http_meta["versions"] == ["1"]
    assert http_meta["platform"] == "onnxruntime"
    assert http_meta["inputs"] == [{"name": "INPUT0", **want_tensor}]
    assert http_meta["outputs"] == [{"name": "OUTPUT0", **want_tensor}]
    grpc_meta = grpc_client.get_model_metadata(name, as_json=True)
    assert grpc_meta["name"] == name
    assert grpc_meta["inputs"][0]["datatype"] == datatype
    assert [int(d) for d in grpc_meta["inputs"][0]["shape"]] == [-1, 4]
    assert http_client.is_model_ready(name)
    assert http_client.is_model_ready(name, model_version="1")
    assert grpc_client.is_model_ready(name)


def test_decision_model_metadata(http_client) -> None:
    metadata = http_client.get_model_metadata("decision")
    assert metadata["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 16]}]
    assert {o["name"] for o in metadata["outputs"]} == {"probabilities", "action"}


# -- inference: every datatype, every wire form ------------------------------------------

HTTP_OUTPUT_MODES = ["all-outputs", "binary-output", "json-output"]


def http_outputs(mode: str) -> list[httpclient.InferRequestedOutput] | None:
    if mode == "all-outputs":
        return None  # tritonclient then asks for binary_data_output on every output
    return [httpclient.InferRequestedOutput("OUTPUT0", binary_data=mode == "binary-output")]


@pytest.mark.parametrize("output_mode", HTTP_OUTPUT_MODES)
@pytest.mark.parametrize("binary_input", [False, True], ids=["json-input", "binary-input"])
@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_http_infer_every_datatype(
    http_client, plugins_dir, datatype: str, binary_input: bool, output_mode: str
) -> None:
    data = sample(datatype)
    request = httpclient.InferInput("INPUT0", list(data.shape), datatype)
    request.set_data_from_numpy(data, binary_data=binary_input)
    result = http_client.infer(
        model_name(datatype), [request], outputs=http_outputs(output_mode), request_id="req-7"
    )
    assert result.get_response()["id"] == "req-7"
    output = result.get_output("OUTPUT0")
    assert output["datatype"] == datatype
    assert ("data" in output) == (output_mode == "json-output")
    assert_equal_tensor(result.as_numpy("OUTPUT0"), expected_identity(plugins_dir, datatype, data))


@pytest.mark.parametrize("request_output", [False, True], ids=["all-outputs", "named-output"])
@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_grpc_infer_every_datatype(
    grpc_client, plugins_dir, datatype: str, request_output: bool
) -> None:
    data = sample(datatype)
    request = grpcclient.InferInput("INPUT0", list(data.shape), datatype)
    request.set_data_from_numpy(data)
    outputs = [grpcclient.InferRequestedOutput("OUTPUT0")] if request_output else None
    result = grpc_client.infer(model_name(datatype), [request], outputs=outputs, request_id="g1")
    assert result.get_response().id == "g1"
    assert_equal_tensor(result.as_numpy("OUTPUT0"), expected_identity(plugins_dir, datatype, data))


def test_grpc_typed_contents_are_accepted(stub) -> None:
    """Clients other than tritonclient send InferTensorContents instead of raw bytes."""
    request = service_pb2.ModelInferRequest(model_name="ident_int8")
    tensor = request.inputs.add(name="INPUT0", datatype="INT8", shape=[1, 4])
    tensor.contents.int_contents.extend([-128, 0, 5, 127])
    response = stub.ModelInfer(request)
    (raw,) = response.raw_output_contents
    assert np.frombuffer(raw, np.int8).tolist() == [-128, 0, 5, 127]


def decision_input() -> np.ndarray:
    return np.random.default_rng(20240607).normal(size=(5, 16)).astype(np.float32)


def assert_matches_decision(probabilities: np.ndarray, action: np.ndarray) -> None:
    want = onnxruntime_run(DECISION, {"features": decision_input()})
    np.testing.assert_allclose(probabilities, want["probabilities"], rtol=1e-5, atol=1e-6)
    assert action.dtype == want["action"].dtype
    assert np.array_equal(action, want["action"])


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_http_decision_model_matches_onnxruntime(http_client, binary: bool) -> None:
    features = decision_input()
    request = httpclient.InferInput("features", list(features.shape), "FP32")
    request.set_data_from_numpy(features, binary_data=binary)
    outputs = [
        httpclient.InferRequestedOutput("probabilities", binary_data=binary),
        httpclient.InferRequestedOutput("action", binary_data=binary),
    ]
    result = http_client.infer("decision", [request], outputs=outputs)
    assert_matches_decision(result.as_numpy("probabilities"), result.as_numpy("action"))


def test_grpc_decision_model_matches_onnxruntime(grpc_client) -> None:
    features = decision_input()
    request = grpcclient.InferInput("features", list(features.shape), "FP32")
    request.set_data_from_numpy(features)
    result = grpc_client.infer("decision", [request])
    assert_matches_decision(result.as_numpy("probabilities"), result.as_numpy("action"))


def test_http_requesting_one_of_two_outputs(http_client) -> None:
    features = decision_input()
    request = httpclient.InferInput("features", list(features.shape), "FP32")
    request.set_data_from_numpy(features)
    result = http_client.infer(
        "decision", [request], outputs=[httpclient.InferRequestedOutput("action")]
    )
    assert [o["name"] for o in result.get_response()["outputs"]] == ["action"]


# -- errors: the right status, the tensor named, the server unharmed ---------------------


def test_unknown_model_http_404(http_client, raw_http) -> None:
    with pytest.raises(InferenceServerException) as err:
        http_client.get_model_metadata("no_such_model")
    assert err.value.status() == "404"
    assert not http_client.is_model_ready("no_such_model")
    response = raw_http.post("/v2/models/no_such_model/infer", json={"inputs": []})
    assert response.status_code == 404
    assert "no_such_model" in response.json()["error"]
    assert_healthy(http_client)


def test_unknown_model_grpc_not_found(grpc_client, http_client) -> None:
    for call in (
        lambda: grpc_client.get_model_metadata("no_such_model"),
        lambda: grpc_client.is_model_ready("no_such_model"),
        lambda: grpc_client.infer("no_such_model", [_grpc_fp32_input()]),
    ):
        with pytest.raises(InferenceServerException) as err:
            call()
        assert err.value.status() == "StatusCode.NOT_FOUND"
    assert_healthy(http_client)


def _grpc_fp32_input(shape: tuple[int, ...] = (1, 4), datatype: str = "FP32"):
    data = np.zeros(shape, dtype=np.float32 if datatype == "FP32" else np.int32)
    request = grpcclient.InferInput("INPUT0", list(shape), datatype)
    request.set_data_from_numpy(data)
    return request


def _http_input(shape: tuple[int, ...], datatype: str, binary: bool) -> httpclient.InferInput:
    data = np.zeros(shape, dtype=np.float32 if datatype == "FP32" else np.int32)
    request = httpclient.InferInput("INPUT0", list(shape), datatype)
    request.set_data_from_numpy(data, binary_data=binary)
    return request


@pytest.mark.parametrize(
    ("shape", "datatype", "message"),
    [((1, 4), "INT32", "datatype"), ((1, 5), "FP32", "shape"), ((4,), "FP32", "shape")],
    ids=["wrong-datatype", "wrong-shape", "wrong-rank"],
)
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_http_wrong_datatype_or_shape_is_400(
    http_client, shape, datatype: str, message: str, binary: bool
) -> None:
    with pytest.raises(InferenceServerException) as err:
        http_client.infer("ident_fp32", [_http_input(shape, datatype, binary)])
    assert err.value.status() == "400"
    assert "INPUT0" in err.value.message() and message in err.value.message()
    assert_healthy(http_client)


@pytest.mark.parametrize(
    ("shape", "datatype", "message"),
    [((1, 4), "INT32", "datatype"), ((1, 5), "FP32", "shape")],
    ids=["wrong-datatype", "wrong-shape"],
)
def test_grpc_wrong_datatype_or_shape_is_invalid_argument(
    grpc_client, http_client, shape, datatype: str, message: str
) -> None:
    with pytest.raises(InferenceServerException) as err:
        grpc_client.infer("ident_fp32", [_grpc_fp32_input(shape, datatype)])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "INPUT0" in err.value.message() and message in err.value.message()
    assert_healthy(http_client)


def _binary_body(doc: dict[str, Any], tail: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(doc).encode()
    return head + tail, {"Inference-Header-Content-Length": str(len(head))}


def _fp32_doc(shape: list[int], **fields: Any) -> dict[str, Any]:
    tensor = {"name": "INPUT0", "datatype": "FP32", "shape": shape, **fields}
    return {"inputs": [tensor]}


@pytest.mark.parametrize(
    ("body", "headers", "message"),
    [
        (json.dumps(_fp32_doc([1, 4], data=[1, 2, 3])).encode(), {}, "needs 4 elements, got 3"),
        (
            *_binary_body(_fp32_doc([1, 4], parameters={"binary_data_size": 12}), b"\0" * 12),
            "expected 16 bytes",
        ),
        (
            *_binary_body(_fp32_doc([1, 4], parameters={"binary_data_size": 16}), b"\0" * 12),
            "runs past the end",
        ),
        (
            *_binary_body(_fp32_doc([1, 4], parameters={"binary_data_size": 16}), b"\0" * 20),
            "bytes of binary data follow",
        ),
        (json.dumps(_fp32_doc([1, 4], data=["a", 1, 2, 3])).encode(), {}, "must be numbers"),
        (json.dumps(_fp32_doc([-1, 4], data=[])).encode(), {}, "non-negative"),
        (b'{"inputs": [', {}, "malformed JSON"),
    ],
    ids=[
        "element-count",
        "byte-length",
        "short-binary",
        "extra-binary",
        "bad-value",
        "bad-shape",
        "bad-json",
    ],
)
def test_http_malformed_tensors_are_400_naming_the_tensor(
    raw_http, http_client, body: bytes, headers: dict[str, str], message: str
) -> None:
    response = raw_http.post("/v2/models/ident_fp32/infer", content=body, headers=headers)
    assert response.status_code == 400
    error = response.json()["error"]
    assert message in error
    if "JSON" not in message and "follow" not in message:
        assert "INPUT0" in error
    assert_healthy(http_client)


def test_http_int8_value_out_of_range_is_400(raw_http, http_client) -> None:
    doc = {
        "inputs": [{"name": "INPUT0", "datatype": "INT8", "shape": [1, 4], "data": [1, 2, 3, 300]}]
    }
    response = raw_http.post("/v2/models/ident_int8/infer", json=doc)
    assert response.status_code == 400
    assert "INPUT0" in response.json()["error"] and "300" in response.json()["error"]
    assert_healthy(http_client)


def test_http_wrong_method_is_405(raw_http) -> None:
    assert raw_http.get("/v2/models/ident_fp32/infer").status_code == 405
    assert raw_http.post("/v2/models/ident_fp32").status_code == 405


def _raw_request(raw: bytes, shape: list[int], datatype: str = "FP32"):
    request = service_pb2.ModelInferRequest(model_name="ident_fp32")
    request.inputs.add(name="INPUT0", datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)
    return request


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (_raw_request(b"\0" * 12, [1, 4]), "expected 16 bytes"),
        (_raw_request(b"\0" * 20, [1, 4]), "expected 16 bytes"),
        (_raw_request(b"\0" * 16, [1, -4]), "non-negative"),
        (_raw_request(b"\0" * 16, [1, 4], "FP99"), "unknown datatype"),
        (_raw_request(b"\0" * 16, [1 << 40, 1 << 40]), "limit"),
    ],
    ids=["byte-length-short", "byte-length-long", "negative-dim", "bad-datatype", "huge-shape"],
)
def test_grpc_malformed_raw_tensors_are_invalid_argument(
    stub, http_client, request_, message: str
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "INPUT0" in err.value.details() and message in err.value.details()
    assert_healthy(http_client)


EMPTY_BUT_HUGE = [[1 << 31, 1 << 31, 0], [1 << 31, 1 << 31, 1 << 31, 0], [0, 1 << 40, 1 << 40]]


@pytest.mark.parametrize("shape", EMPTY_BUT_HUGE, ids=lambda shape: f"{len(shape)}-dims")
def test_empty_shapes_with_overflowing_dimensions_are_client_errors(
    raw_http, stub, http_client, shape: list[int]
) -> None:
    # Zero elements, but dimensions numpy cannot lay out: REST 500 / gRPC INTERNAL with a
    # traceback in all three decoders before shapes were checked for it.
    named = str(shape)
    as_json = raw_http.post("/v2/models/ident_fp32/infer", json=_fp32_doc(shape, data=[]))
    assert as_json.status_code == 400 and named in as_json.json()["error"]
    body, headers = _binary_body(_fp32_doc(shape, parameters={"binary_data_size": 0}), b"")
    binary = raw_http.post("/v2/models/ident_fp32/infer", content=body, headers=headers)
    assert binary.status_code == 400 and named in binary.json()["error"]
    for request in (_raw_request(b"", shape), _contents_request(shape)):
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "INPUT0" in err.value.details() and named in err.value.details()
    assert_healthy(http_client)


def _contents_request(shape: list[int]):
    request = service_pb2.ModelInferRequest(model_name="ident_fp32")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=shape)
    return request


def test_grpc_element_count_mismatch_in_contents(stub, http_client) -> None:
    request = service_pb2.ModelInferRequest(model_name="ident_fp32")
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    tensor.contents.fp32_contents.extend([1.0, 2.0, 3.0])
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "INPUT0" in err.value.details() and "needs 4 elements, got 3" in err.value.details()
    assert_healthy(http_client)


def test_grpc_bytes_length_prefix_out_of_bounds(stub, http_client) -> None:
    request = service_pb2.ModelInferRequest(model_name="ident_bytes")
    request.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, 4])
    request.raw_input_contents.append(struct.pack("<I", 1000) + b"abc" + b"\0" * 13)
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "INPUT0" in err.value.details()
    assert_healthy(http_client)


def test_grpc_malformed_protobuf_is_invalid_argument(channel, http_client) -> None:
    raw = channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    with pytest.raises(grpc.RpcError) as err:
        raw(b"\x0a\xff\xff\xff\xff\x0f")  # field 1, length far past the end
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert_healthy(http_client)


def test_http_request_timeout_is_504(raw_http, http_client) -> None:
    # 1 µs cannot cover the batching window: the service gives up with DEADLINE_EXCEEDED.
    doc = _fp32_doc([1, 4], data=[1, 2, 3, 4])
    doc["parameters"] = {"timeout": 1}
    response = raw_http.post("/v2/models/ident_fp32/infer", json=doc)
    assert response.status_code == 504
    assert response.json()["error"]
    assert_healthy(http_client)


def test_metrics_label_kserve_routes_without_model_names(raw_http, http_client) -> None:
    assert_healthy(http_client)
    text = raw_http.get("/metrics").text
    assert 'method="/v2/models/{name}/infer"' in text
    assert "ident_fp32/infer" not in text


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.get_model_config("decision"),
        lambda c: c.get_inference_statistics("decision"),
        lambda c: c.get_model_repository_index(),
    ],
    ids=["ModelConfig", "ModelStatistics", "RepositoryIndex"],
)
def test_grpc_unimplemented_methods_are_unimplemented(grpc_client, http_client, call) -> None:
    # Was a bare HTTP 404, which tritonclient reports as "Received http2 header with
    # status: 404"; now a gRPC status the client can act on.
    with pytest.raises(InferenceServerException) as err:
        call(grpc_client)
    assert err.value.status() == "StatusCode.UNIMPLEMENTED"
    assert "unknown method" in err.value.message()
    assert_healthy(http_client)


def test_grpc_stream_infer_is_unimplemented(stub, http_client) -> None:
    request = service_pb2.ModelInferRequest(model_name="ident_fp32")
    with pytest.raises(grpc.RpcError) as err:
        list(stub.ModelStreamInfer(iter([request]), timeout=10))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert_healthy(http_client)


def _grpc_fp32_request(**parameter: Any) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="ident_fp32")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.ones((1, 4), dtype=np.float32).tobytes())
    for kind, value in parameter.items():
        setattr(request.parameters["timeout"], kind, value)
    return request


@pytest.mark.parametrize(
    "parameter",
    [{"int64_param": -1}, {"string_param": "x"}, {"double_param": 1.5}, {"bool_param": True}],
    ids=["negative", "string", "double", "bool"],
)
def test_grpc_malformed_timeout_parameter_is_invalid_argument(stub, http_client, parameter) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(_grpc_fp32_request(**parameter), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "timeout" in err.value.details()
    assert_healthy(http_client)


def test_grpc_timeout_parameter_bounds_the_request(grpc_client, stub, http_client) -> None:
    # As over REST: 1 µs cannot cover the batching window, so the request gives up.
    request = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
    request.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
    with pytest.raises(InferenceServerException) as err:
        grpc_client.infer("ident_fp32", [request], timeout=1)
    assert err.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    # 0 means no request-level timeout, and a generous one lets the request finish.
    for micros in (0, 30_000_000):
        reply = stub.ModelInfer(_grpc_fp32_request(int64_param=micros), timeout=10)
        assert np.frombuffer(reply.raw_output_contents[0], np.float32).tolist() == [1.0] * 4
    assert_healthy(http_client)


# -- errors name no server file path -----------------------------------------------------


def _server_paths(text: str) -> list[str]:
    """Absolute paths in ``text`` that start with a top-level directory of this machine."""
    tops = "|".join(re.escape(name) for name in os.listdir("/"))
    return re.findall(rf"(?<![\w.])/(?:{tops})/[^\s'\":,]*", text)


def test_model_load_errors_name_no_server_paths(
    kserve_server, plugins_dir, raw_http, stub, http_client
) -> None:
    seen: list[str] = []
    for name, why in [("broken", "not a loadable ONNX model"), ("misnamed", "differs from")]:
        loaded = raw_http.post(f"/v2/repository/models/{name}/load")
        assert loaded.status_code == 400 and why in loaded.json()["error"]
        inferred = raw_http.post(f"/v2/models/{name}/infer", json=_fp32_doc([1, 4], data=[1] * 4))
        assert inferred.status_code == 503 and why in inferred.json()["error"]
        metadata = raw_http.get(f"/v2/models/{name}")
        seen += [loaded.text, inferred.text, metadata.text]
        request = service_pb2.ModelInferRequest(model_name=name)
        request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
        request.raw_input_contents.append(b"\0" * 16)
        for method, message in (
            (stub.ModelInfer, request),
            (stub.ModelMetadata, service_pb2.ModelMetadataRequest(name=name)),
        ):
            with pytest.raises(grpc.RpcError) as err:
                method(message)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert why in err.value.details()
            seen.append(err.value.details())
    # A failed reload keeps the previous version serving; its reason names no path either.
    model_file = plugins_dir / "models" / "reloadable" / "model.onnx"
    good = model_file.read_bytes()
    model_file.write_bytes(b"not a model any more")
    try:
        reload = raw_http.post("/v2/repository/models/reloadable/load")
        assert reload.status_code == 400 and "still served" in reload.json()["error"]
        index = {m["name"]: m for m in raw_http.post("/v2/repository/index").json()}
        assert index["reloadable"]["reason"].startswith("reload failed")
        seen += [reload.text, *(m["reason"] for m in index.values())]
    finally:
        model_file.write_bytes(good)
    assert raw_http.post("/v2/repository/models/reloadable/load").status_code == 200
    for text in seen:
        assert _server_paths(text) == [] and plugins_dir.name not in text, text
    # The operator's log keeps the whole story, paths included.
    assert str(plugins_dir / "models" / "broken" / "model.onnx") in kserve_server.log()
    assert_healthy(http_client)
