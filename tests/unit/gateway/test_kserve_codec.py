"""KServe v2 codecs: tensors (JSON, raw bytes, gRPC contents), REST documents and routes.

No protobuf here: agentd's ``inference`` package must not be imported in the test process
(tritonclient registers the same proto package), so gRPC contents are given as plain dicts.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import subprocess
import sys
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentd.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from agentd.gateway.kserve import codec
from agentd.gateway.kserve.codec import (
    CONTENTS_FIELD,
    decode_contents,
    decode_json,
    decode_raw,
    encode_raw,
    json_data,
)
from agentd.gateway.kserve.rest import KServeRest, RouteKind, match_route
from agentd.gateway.kserve.rest_codec import (
    InferRequest,
    RequestedOutput,
    decode_request,
    encode_response,
)
from agentd.inference.types import (
    DataType,
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
    TensorSpec,
)

ALL_TYPES = list(DataType)
NUMERIC = [dt for dt in DataType if dt is not DataType.BYTES]


def sample(dtype: DataType, shape: tuple[int, ...] = (2, 3)) -> np.ndarray:
    """A tensor with values at the edges of the type's range."""
    count = math.prod(shape)
    if dtype is DataType.BYTES:
        items = [b"", b"a", "é".encode(), b"hello world", b"x" * 300, b"\x00z"]
        out = np.empty(count, dtype=object)
        out[:] = [items[i % len(items)] for i in range(count)]
        return out.reshape(shape)
    np_type = dtype.numpy
    if dtype is DataType.BOOL:
        values: list[Any] = [i % 2 == 0 for i in range(count)]
    elif np_type.kind in "iu":
        info = np.iinfo(np_type)
        edges = [int(info.min), int(info.max), 0, 1, int(info.max) // 3]
        values = [edges[i % len(edges)] for i in range(count)]
    else:
        info = np.finfo(np_type)
        edges = [float(info.max), float(info.min), 0.0, -1.5, 0.1, float(info.tiny)]
        values = [edges[i % len(edges)] for i in range(count)]
    return np.array(values, dtype=np_type).reshape(shape)


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert got.tolist() == want.tolist()


# -- round trips -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_TYPES, ids=lambda d: d.value)
@pytest.mark.parametrize("shape", [(2, 3), (0, 4), (), (1, 1, 5)], ids=str)
def test_raw_round_trip(dtype: DataType, shape: tuple[int, ...]) -> None:
    array = sample(dtype, shape)
    decoded = decode_raw("T", dtype.value, list(shape), encode_raw(array))
    assert_same(decoded, array)


@pytest.mark.parametrize("dtype", ALL_TYPES, ids=lambda d: d.value)
@pytest.mark.parametrize("shape", [(2, 3), (0, 4), (), (1, 1, 5)], ids=str)
def test_json_round_trip(dtype: DataType, shape: tuple[int, ...]) -> None:
    array = sample(dtype, shape)
    wire = orjson.loads(orjson.dumps(json_data(array), option=orjson.OPT_SERIALIZE_NUMPY))
    assert_same(decode_json("T", dtype.value, list(shape), wire), array)


@pytest.mark.parametrize("dtype", ALL_TYPES, ids=lambda d: d.value)
def test_json_accepts_nested_data_in_row_major_order(dtype: DataType) -> None:
    array = sample(dtype, (2, 3))
    nested = orjson.loads(orjson.dumps(json_data(array), option=orjson.OPT_SERIALIZE_NUMPY))
    nested = [nested[:3], nested[3:]]
    assert_same(decode_json("T", dtype.value, [2, 3], nested), array)
    # Nesting need not follow the shape: only the row-major order counts.
    odd = [[nested[0][:1], [nested[0][1:]]], nested[1]]
    assert_same(decode_json("T", dtype.value, [2, 3], odd), array)


@pytest.mark.parametrize("dtype", [d for d in ALL_TYPES if CONTENTS_FIELD[d]], ids=str)
def test_contents_round_trip(dtype: DataType) -> None:
    array = sample(dtype)
    field = CONTENTS_FIELD[dtype]
    assert field is not None
    others = {name: [] for name in set(CONTENTS_FIELD.values()) if name and name != field}
    fields = {field: array.reshape(-1).tolist(), **others}
    assert_same(decode_contents("T", dtype.value, [2, 3], fields), array)


def test_raw_decode_is_a_zero_copy_view_of_the_request_buffer() -> None:
    array = np.arange(12, dtype=np.float32)
    body = b"header" + array.tobytes()
    decoded = decode_raw("T", "FP32", [3, 4], memoryview(body)[6:])
    assert np.shares_memory(decoded, np.frombuffer(body, np.uint8))
    assert not decoded.flags.writeable
    assert_same(decoded, array.reshape(3, 4))


def test_raw_layout_is_little_endian_and_length_prefixed() -> None:
    assert encode_raw(np.array([1, 2], dtype=np.int32)) == b"\x01\x00\x00\x00\x02\x00\x00\x00"
    words = np.array([b"ab", b""], dtype=object)
    assert encode_raw(words) == b"\x02\x00\x00\x00ab\x00\x00\x00\x00"
    assert encode_raw(np.array([True, False])) == b"\x01\x00"


def test_encoders_accept_str_elements_from_models() -> None:
    # ONNX Runtime returns string tensors as object arrays of str.
    strings = np.array(["hé", "x"], dtype=object)
    assert decode_raw("T", "BYTES", [2], encode_raw(strings)).tolist() == ["hé".encode(), b"x"]
    assert json_data(strings) == ["hé", "x"]


def test_json_output_of_non_utf8_bytes_asks_for_binary() -> None:
    with pytest.raises(InvalidArgument, match="binary_data"):
        json_data(np.array([b"\xff"], dtype=object))


# -- validation: every error names the tensor ---------------------------------------------

JSON_ERRORS = [
    ("FP99", [1], [1.0], "unknown datatype"),
    (7, [1], [1.0], "datatype must be a string"),
    ("FP32", "4", [1.0], "shape must be a list"),
    ("FP32", [-1], [], "non-negative"),
    ("FP32", [True], [1.0], "non-negative integers"),
    ("FP32", [1.5], [1.0], "non-negative integers"),
    ("FP32", [1] * 33, [1.0], "dimensions"),
    ("FP32", [1 << 20, 1 << 20], [], "more than the limit"),
    ("FP32", [2, 2], [1.0, 2.0, 3.0], "needs 4 elements, got 3"),
    ("FP32", [1], 1.0, "must be a JSON array"),
    ("FP32", [1], ["1.0"], "FP32 values must be numbers"),
    ("FP32", [1], [True], "FP32 values must be numbers"),
    ("FP32", [1], [1e39], "outside the range of FP32"),
    ("FP16", [1], [70000], "outside the range of FP16"),
    ("INT8", [1], [300], "does not fit INT8"),
    ("INT8", [1], [-129], "does not fit INT8"),
    ("UINT8", [1], [-1], "does not fit UINT8"),
    ("UINT64", [1], [1 << 64], "does not fit UINT64"),
    ("INT64", [1], [1 << 63], "does not fit INT64"),
    ("INT32", [1], [1.5], "INT32 values must be integers"),
    ("INT32", [1], [True], "INT32 values must be integers"),
    ("BOOL", [1], [1], "true or false"),
    ("BOOL", [1], [None], "true or false"),
    ("BYTES", [1], [1], "BYTES values must be strings"),
    ("BYTES", [1], ["\ud800"], "not valid text"),
]


@pytest.mark.parametrize(("datatype", "shape", "data", "message"), JSON_ERRORS)
def test_json_validation_errors(datatype: Any, shape: Any, data: Any, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message) as err:
        decode_json("the_tensor", datatype, shape, data)
    assert "'the_tensor'" in err.value.message


RAW_ERRORS = [
    ("FP32", [2, 2], b"\x00" * 15, "expected 16 bytes for 4 FP32 elements"),
    ("FP32", [2, 2], b"\x00" * 17, "expected 16 bytes"),
    ("INT64", [1], b"", "expected 8 bytes"),
    ("BOOL", [2], b"\x01\x02", "0 or 1"),
    ("BYTES", [3], b"\x00" * 8, "need at least 12 bytes"),
    ("BYTES", [1], b"\x05\x00\x00\x00abc", "declares 5 bytes but only 3 remain"),
    ("BYTES", [1], b"\x01\x00\x00\x00abc", "2 bytes left over"),
    ("BYTES", [2], b"\x03\x00\x00\x00abc\x01\x00", "no length prefix"),
    ("BYTES", [1 << 30], b"\x00" * 8, "need at least"),
    ("FP32", [1 << 31, 4], b"", "more than the limit"),
    ("STRING", [1], b"", "unknown datatype"),
]


@pytest.mark.parametrize(("datatype", "shape", "data", "message"), RAW_ERRORS)
def test_raw_validation_errors(datatype: str, shape: list[int], data: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message) as err:
        decode_raw("the_tensor", datatype, shape, data)
    assert "'the_tensor'" in err.value.message


CONTENTS_ERRORS = [
    ("FP16", [1], {"fp32_contents": [1.0]}, "send it in raw_input_contents"),
    ("INT32", [1], {"fp32_contents": [1.0]}, "expects values in int_contents, got fp32"),
    ("INT8", [1], {"int_contents": [200]}, "does not fit INT8"),
    ("UINT16", [1], {"uint_contents": [70000]}, "does not fit UINT16"),
    ("INT32", [2], {"int_contents": [1]}, "needs 2 elements, got 1"),
    ("FP32", [1], {}, "needs 1 elements, got 0"),
    ("BYTES", [1], {"bytes_contents": ["text"]}, "BYTES values must be bytes"),
    ("BOOL", [1], {"bool_contents": [2]}, "true or false"),
]


@pytest.mark.parametrize(("datatype", "shape", "fields", "message"), CONTENTS_ERRORS)
def test_contents_validation_errors(datatype: str, shape: list[int], fields: Any, message: str):
    with pytest.raises(InvalidArgument, match=message) as err:
        decode_contents("the_tensor", datatype, shape, fields)
    assert "'the_tensor'" in err.value.message


def test_lying_shape_is_refused_without_allocating() -> None:
    # 2**30 BYTES elements would need an 8 GiB object array; the prefix check comes first.
    with pytest.raises(InvalidArgument):
        decode_raw("T", "BYTES", [1 << 15, 1 << 15], b"\x00" * 64)
    # A zero-element tensor with a huge dimension is legal and costs nothing.
    assert decode_raw("T", "FP32", [0, 1 << 31], b"").shape == (0, 1 << 31)


EMPTY_BUT_HUGE = [
    [1 << 31, 1 << 31, 0],
    [0, 1 << 31, 1 << 31],
    [1 << 31, 1 << 31, 1 << 31, 0],  # the product overflows int64 before the zero
    [1 << 20, 1 << 20, 0, 1 << 20],
    [(1 << 31)] * 31 + [0],
]
DECODERS = {
    "json": lambda shape: decode_json("T", "FP32", shape, []),
    "raw": lambda shape: decode_raw("T", "FP32", shape, b""),
    "raw BYTES": lambda shape: decode_raw("T", "BYTES", shape, b""),
    "contents": lambda shape: decode_contents("T", "INT64", shape, {}),
}


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("shape", EMPTY_BUT_HUGE, ids=lambda shape: f"{len(shape)}-dims")
def test_an_empty_shape_with_overflowing_dimensions_is_refused(decoder, shape) -> None:
    # numpy refuses to lay these out ("array is too big"): a 500 before they were checked.
    with pytest.raises(InvalidArgument, match="non-zero dimensions multiply to") as err:
        DECODERS[decoder](shape)
    assert str(shape) in err.value.message and "'T'" in err.value.message


# -- fuzzing: any input decodes or raises InvalidArgument, nothing else -------------------

DATATYPES = st.one_of(
    st.sampled_from([d.value for d in DataType]), st.text(max_size=8), st.integers(), st.none()
)
DIMS = st.one_of(
    st.integers(min_value=0, max_value=6),
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.booleans(),
    st.floats(allow_nan=False),
    st.text(max_size=3),
)
SHAPES = st.one_of(
    st.lists(st.integers(min_value=0, max_value=6), max_size=4),
    st.lists(DIMS, max_size=40),
    st.text(max_size=4),
    st.none(),
    st.integers(),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.floats(),
    st.text(max_size=10),
    st.binary(max_size=10),
)
JSON_VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(), inner)
)
# AGENTD_FUZZ_EXAMPLES=20000 for a longer hunt than the default suite affords.
FUZZ = settings(
    max_examples=int(os.environ.get("AGENTD_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _check_decoded(array: object, shape: object) -> None:
    assert isinstance(array, np.ndarray)
    assert list(array.shape) == list(shape)  # type: ignore[call-overload]
    assert array.size <= codec.MAX_ELEMENTS


# Dimensions at the edges of the limits, with a zero among them now and then.
EDGE_DIMS = st.sampled_from(
    [0, 0, 1, 2, 7, (1 << 15), (1 << 31) - 1, 1 << 31, (1 << 32) + 1, 1 << 62, 1 << 63]
)


@FUZZ
@given(shape=st.lists(EDGE_DIMS, max_size=6), decoder=st.sampled_from(sorted(DECODERS)))
def test_fuzz_shapes_at_the_edges(shape: list[int], decoder: str) -> None:
    if math.prod(shape):
        return  # non-empty shapes need data; the other fuzzers cover them
    try:
        array = DECODERS[decoder](shape)
    except InvalidArgument:
        return
    _check_decoded(array, shape)


@FUZZ
@given(datatype=DATATYPES, shape=SHAPES, buffer=st.binary(max_size=64))
def test_fuzz_decode_raw(datatype: Any, shape: Any, buffer: bytes) -> None:
    try:
        array = decode_raw("T", datatype, shape, buffer)
    except InvalidArgument:
        return
    _check_decoded(array, shape)


@FUZZ
@given(
    datatype=st.sampled_from([d.value for d in DataType]),
    shape=st.lists(st.integers(min_value=0, max_value=4), max_size=3),
    data=st.data(),
)
def test_fuzz_decode_raw_with_plausible_sizes(datatype: str, shape: list[int], data) -> None:
    # Lengths near the right one reach the BYTES prefix walk and the BOOL check.
    count = math.prod(shape)
    size = data.draw(st.integers(min_value=0, max_value=count * 8 + 8))
    buffer = data.draw(st.binary(min_size=size, max_size=size))
    try:
        array = decode_raw("T", datatype, shape, buffer)
    except InvalidArgument:
        return
    _check_decoded(array, shape)


@FUZZ
@given(datatype=DATATYPES, shape=SHAPES, value=JSON_VALUES)
def test_fuzz_decode_json(datatype: Any, shape: Any, value: Any) -> None:
    try:
        array = decode_json("T", datatype, shape, value)
    except InvalidArgument:
        return
    _check_decoded(array, shape)


@FUZZ
@given(
    datatype=st.sampled_from([d.value for d in DataType]),
    shape=st.lists(st.integers(min_value=0, max_value=3), max_size=3),
    data=st.data(),
)
def test_fuzz_decode_json_with_matching_counts(datatype: str, shape: list[int], data) -> None:
    values = data.draw(st.lists(SCALARS, min_size=math.prod(shape), max_size=math.prod(shape)))
    try:
        array = decode_json("T", datatype, shape, values)
    except InvalidArgument:
        return
    _check_decoded(array, shape)


FIELD_NAMES = st.sampled_from([*sorted({f for f in CONTENTS_FIELD.values() if f}), "other"])


@FUZZ
@given(
    datatype=DATATYPES,
    shape=SHAPES,
    fields=st.dictionaries(FIELD_NAMES, st.lists(SCALARS, max_size=6), max_size=3),
)
def test_fuzz_decode_contents(datatype: Any, shape: Any, fields: dict[str, list[Any]]) -> None:
    try:
        array = decode_contents("T", datatype, shape, fields)
    except InvalidArgument:
        return
    _check_decoded(array, shape)


@FUZZ
@given(body=st.binary(max_size=200), header_length=st.none() | st.integers(-5, 250))
def test_fuzz_decode_request_bytes(body: bytes, header_length: int | None) -> None:
    with contextlib.suppress(InvalidArgument):
        decode_request(body, header_length)


TENSOR_DOCS = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["a", "b", ""]) | SCALARS,
        "datatype": DATATYPES,
        "shape": SHAPES,
        "data": JSON_VALUES,
        "parameters": st.fixed_dictionaries(
            {},
            optional={
                "binary_data_size": st.integers(-2, 40) | SCALARS,
                "binary_data": SCALARS,
            },
        )
        | JSON_VALUES,
    },
)
REQUEST_DOCS = st.fixed_dictionaries(
    {},
    optional={
        "id": SCALARS,
        "inputs": st.lists(TENSOR_DOCS, max_size=3) | JSON_VALUES,
        "outputs": st.lists(TENSOR_DOCS, max_size=3) | JSON_VALUES,
        "parameters": st.fixed_dictionaries(
            {}, optional={"binary_data_output": SCALARS, "timeout": SCALARS}
        )
        | JSON_VALUES,
    },
)


@FUZZ
@given(doc=REQUEST_DOCS, tail=st.binary(max_size=48), binary=st.booleans())
def test_fuzz_decode_request_documents(doc: dict[str, Any], tail: bytes, binary: bool) -> None:
    try:
        head = orjson.dumps(doc)
    except (TypeError, orjson.JSONEncodeError):
        return  # not JSON-encodable (bytes, huge ints): not a request a client can send
    body, length = (head + tail, len(head)) if binary else (head, None)
    try:
        request = decode_request(body, length)
    except InvalidArgument:
        return
    for name, array in request.inputs.items():
        assert isinstance(name, str)
        assert isinstance(array, np.ndarray)


# -- REST documents ---------------------------------------------------------------------


def test_binary_request_inputs_are_views_in_input_order() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([b"xy", b"z"], dtype=object)
    raw_b = encode_raw(b)
    head = orjson.dumps(
        {
            "id": "r1",
            "inputs": [
                {
                    "name": "A",
                    "datatype": "FP32",
                    "shape": [2, 3],
                    "parameters": {"binary_data_size": 24},
                },
                {"name": "J", "datatype": "INT32", "shape": [2], "data": [7, 8]},
                {
                    "name": "B",
                    "datatype": "BYTES",
                    "shape": [2],
                    "parameters": {"binary_data_size": len(raw_b)},
                },
            ],
            "outputs": [{"name": "Y", "parameters": {"binary_data": True}}, {"name": "Z"}],
            "parameters": {"timeout": 2_500_000},
        }
    )
    body = head + a.tobytes() + raw_b
    request = decode_request(body, len(head))
    assert request.id == "r1"
    assert request.timeout_s == 2.5
    assert request.output_names == ["Y", "Z"]
    assert request.outputs == (RequestedOutput("Y", True), RequestedOutput("Z", None))
    assert_same(request.inputs["A"], a)
    assert np.shares_memory(request.inputs["A"], np.frombuffer(body, np.uint8))
    assert request.inputs["J"].tolist() == [7, 8]
    assert request.inputs["B"].tolist() == [b"xy", b"z"]


@pytest.mark.parametrize(
    ("doc", "tail", "binary", "message"),
    [
        (
            {
                "inputs": [
                    {
                        "name": "A",
                        "datatype": "FP32",
                        "shape": [1],
                        "parameters": {"binary_data_size": 4},
                    }
                ]
            },
            b"",
            False,
            "no Inference-Header-Content-Length",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "A",
                        "datatype": "FP32",
                        "shape": [1],
                        "parameters": {"binary_data_size": 8},
                    }
                ]
            },
            b"\x00" * 4,
            True,
            "runs past the end",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "A",
                        "datatype": "FP32",
                        "shape": [1],
                        "parameters": {"binary_data_size": 4},
                    }
                ]
            },
            b"\x00" * 6,
            True,
            "2 bytes of binary data follow",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "A",
                        "datatype": "FP32",
                        "shape": [2],
                        "parameters": {"binary_data_size": 4},
                    }
                ]
            },
            b"\x00" * 4,
            True,
            "'A': expected 8 bytes",
        ),
        (
            {"inputs": [{"name": "A", "datatype": "FP32", "shape": [1]}]},
            b"",
            False,
            "neither 'data' nor binary_data_size",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "A",
                        "datatype": "FP32",
                        "shape": [1],
                        "data": [1],
                        "parameters": {"binary_data_size": 4},
                    }
                ]
            },
            b"\x00" * 4,
            True,
            "both",
        ),
        (
            {"inputs": [{"name": "A", "datatype": "FP32", "shape": [1], "data": [1]}] * 2},
            b"",
            False,
            "given twice",
        ),
        ({"inputs": {}}, b"", False, "'inputs' must be a list"),
        ({"inputs": [], "outputs": [{"name": "Y"}] * 2}, b"", False, "requested twice"),
        (
            {"inputs": [], "outputs": [{"name": "Y", "parameters": {"classification": 3}}]},
            b"",
            False,
            "'classification' is not supported",
        ),
        (
            {"inputs": [], "outputs": [{"name": "Y", "parameters": {"binary_data": 1}}]},
            b"",
            False,
            "binary_data must be true or false",
        ),
        ({"inputs": [], "id": 5}, b"", False, "'id' must be a string"),
        ({"inputs": [], "parameters": {"timeout": -1}}, b"", False, "timeout"),
        (
            {"inputs": [], "parameters": {"binary_data_output": "yes"}},
            b"",
            False,
            "binary_data_output",
        ),
    ],
)
def test_request_document_errors(doc: Any, tail: bytes, binary: bool, message: str) -> None:
    head = orjson.dumps(doc)
    with pytest.raises(InvalidArgument, match=message):
        decode_request(head + tail, len(head) if binary else None)


def test_request_rejects_bad_header_length_and_json() -> None:
    with pytest.raises(InvalidArgument, match="outside"):
        decode_request(b"{}", 3)
    with pytest.raises(InvalidArgument, match="malformed JSON"):
        decode_request(b"{nope", None)
    with pytest.raises(InvalidArgument, match="expected an object"):
        decode_request(b"[]", None)


def _split_binary(body: bytes, length: int | None) -> tuple[dict[str, Any], bytes]:
    if length is None:
        return orjson.loads(body), b""
    return orjson.loads(body[:length]), body[length:]


def test_response_mixes_json_and_binary_outputs_per_request() -> None:
    outputs = {"Y": np.array([[1.5, 2.0]], dtype=np.float32), "Z": np.array([b"ok"], object)}
    request = InferRequest({}, (RequestedOutput("Y", True), RequestedOutput("Z", None)), False, "7")
    body, length = encode_response("m", "1", request, outputs)
    doc, tail = _split_binary(body, length)
    assert doc["model_name"] == "m" and doc["model_version"] == "1" and doc["id"] == "7"
    y, z = doc["outputs"]
    assert y == {
        "name": "Y",
        "datatype": "FP32",
        "shape": [1, 2],
        "parameters": {"binary_data_size": 8},
    }
    assert tail == outputs["Y"].tobytes()
    assert z == {"name": "Z", "datatype": "BYTES", "shape": [1], "data": ["ok"]}


def test_response_binary_default_and_json_only() -> None:
    outputs = {"Y": np.array([True, False])}
    body, length = encode_response("m", "1", InferRequest({}, None, True), outputs)
    doc, tail = _split_binary(body, length)
    assert doc["outputs"][0]["parameters"] == {"binary_data_size": 2}
    assert tail == b"\x01\x00"
    assert "id" not in doc
    body, length = encode_response("m", "1", InferRequest({}, None, False), outputs)
    assert length is None
    assert orjson.loads(body)["outputs"][0]["data"] == [True, False]


# -- routes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "kind", "label", "model", "version"),
    [
        ("/v2", RouteKind.SERVER_METADATA, "/v2", None, None),
        ("/v2/health/live", RouteKind.LIVE, "/v2/health/live", None, None),
        ("/v2/health/ready", RouteKind.READY, "/v2/health/ready", None, None),
        ("/v2/models/m", RouteKind.MODEL_METADATA, "/v2/models/{name}", "m", None),
        ("/v2/models/m/ready", RouteKind.MODEL_READY, "/v2/models/{name}/ready", "m", None),
        ("/v2/models/m/infer", RouteKind.INFER, "/v2/models/{name}/infer", "m", None),
        (
            "/v2/models/m/versions/3",
            RouteKind.MODEL_METADATA,
            "/v2/models/{name}/versions/{version}",
            "m",
            "3",
        ),
        (
            "/v2/models/m/versions/3/infer",
            RouteKind.INFER,
            "/v2/models/{name}/versions/{version}/infer",
            "m",
            "3",
        ),
        (
            "/v2/models/m/versions/3/ready",
            RouteKind.MODEL_READY,
            "/v2/models/{name}/versions/{version}/ready",
            "m",
            "3",
        ),
        ("/v2/models/m/stats", RouteKind.UNKNOWN, "other", None, None),
        ("/v2/models/", RouteKind.UNKNOWN, "other", None, None),
        ("/v2/repository/index", RouteKind.UNKNOWN, "other", None, None),
    ],
)
def test_routes_and_bounded_metric_labels(path, kind, label, model, version) -> None:
    route = match_route(path)
    assert route is not None
    assert (route.kind, route.label, route.model, route.version) == (kind, label, model, version)
    assert KServeRest.route_label(path) == label


@pytest.mark.parametrize("path", ["/", "/v1/models", "/v2x", "/healthz"])
def test_non_kserve_paths_are_not_matched(path: str) -> None:
    assert match_route(path) is None
    assert KServeRest.route_label(path) is None


# -- the REST handler over a fake service -------------------------------------------------

IDENT = ModelMetadata(
    name="ident",
    version="1",
    platform="onnxruntime",
    inputs=(TensorSpec("INPUT0", DataType.FP32, (-1, 4)),),
    outputs=(TensorSpec("OUTPUT0", DataType.FP32, (-1, 4)),),
    max_batch_size=8,
)


class FakeService:
    """The InferenceService contract, echoing INPUT0 as OUTPUT0."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.calls: list[dict[str, Any]] = []

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return False

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "agentd", "version": "0.1.0", "extensions": ["binary_tensor_data"]}

    def model_names(self) -> list[str]:
        return ["ident"]

    def metadata(self, name: str, version: str | None = None) -> ModelMetadata:
        if name != "ident" or version not in (None, "1"):
            raise NotFound(f"unknown model {name!r}")
        return IDENT

    def is_ready(self, name: str, version: str | None = None) -> bool:
        self.metadata(name, version)
        return True

    async def infer_request(self, request: InferenceRequest) -> InferenceResponse:
        inputs = request.inputs
        self.calls.append(
            {"inputs": inputs, "outputs": request.outputs, "timeout": request.timeout}
        )
        if self.error is not None:
            raise self.error
        return InferenceResponse("ident", "1", {"OUTPUT0": np.asarray(inputs["INPUT0"]).copy()})


async def call(
    handler: KServeRest,
    method: str,
    path: str,
    body: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> tuple[bool, int, dict[bytes, bytes], bytes]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": headers or []}
    handled = await handler.handle(scope, body, send)
    if not handled:
        return False, 0, {}, b""
    start, *bodies = sent
    return True, start["status"], dict(start["headers"]), b"".join(m["body"] for m in bodies)


def rest(service: FakeService | None = None) -> KServeRest:
    return KServeRest(service or FakeService(), max_body_bytes=1 << 16)  # type: ignore[arg-type]


INFER_DOC = {
    "id": "abc",
    "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}],
}


async def test_rest_json_infer_echoes_id_and_leaves_the_default_deadline_to_the_service() -> None:
    service = FakeService()
    handled, status, headers, body = await call(
        rest(service), "POST", "/v2/models/ident/infer", orjson.dumps(INFER_DOC)
    )
    assert handled and status == 200
    assert headers[b"content-type"] == b"application/json"
    doc = orjson.loads(body)
    assert doc["id"] == "abc" and doc["model_version"] == "1"
    assert doc["outputs"] == [
        {"name": "OUTPUT0", "datatype": "FP32", "shape": [1, 4], "data": [1.0, 2.0, 3.0, 4.0]}
    ]
    # No timeout parameter: None goes to the service, whose deadline rule applies its
    # default (the adapter only converts, the same as KServe gRPC).
    assert service.calls[0]["timeout"] is None and service.calls[0]["outputs"] is None


async def test_rest_binary_infer_round_trip() -> None:
    data = np.arange(8, dtype=np.float32).reshape(2, 4)
    head = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT0",
                    "datatype": "FP32",
                    "shape": [2, 4],
                    "parameters": {"binary_data_size": 32},
                }
            ],
            "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
        }
    )
    _, status, headers, body = await call(
        rest(),
        "POST",
        "/v2/models/ident/versions/1/infer",
        head + data.tobytes(),
        [(b"inference-header-content-length", str(len(head)).encode())],
    )
    assert status == 200
    assert headers[b"content-type"] == b"application/octet-stream"
    length = int(headers[b"inference-header-content-length"])
    assert np.frombuffer(body[length:], np.float32).tolist() == data.reshape(-1).tolist()


async def test_rest_gzip_body_is_inflated_within_the_limit() -> None:
    _, status, _, _ = await call(
        rest(),
        "POST",
        "/v2/models/ident/infer",
        gzip.compress(orjson.dumps(INFER_DOC)),
        [(b"content-encoding", b"gzip")],
    )
    assert status == 200
    bomb = gzip.compress(b" " * (1 << 20))
    _, status, _, body = await call(
        rest(), "POST", "/v2/models/ident/infer", bomb, [(b"content-encoding", b"gzip")]
    )
    assert status == 413 and b"limit" in body
    _, status, _, _ = await call(
        rest(), "POST", "/v2/models/ident/infer", b"x", [(b"content-encoding", b"br")]
    )
    assert status == 400


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (ResourceExhausted("queue full"), 429),
        (DeadlineExceeded("too slow"), 504),
        (InvalidArgument("input 'INPUT0': expected datatype FP32"), 400),
    ],
)
async def test_rest_maps_service_errors(error: Exception, status: int) -> None:
    _, got, _, body = await call(
        rest(FakeService(error)), "POST", "/v2/models/ident/infer", orjson.dumps(INFER_DOC)
    )
    assert got == status
    assert orjson.loads(body) == {"error": str(error)}


async def test_rest_errors_for_model_method_body_and_route() -> None:
    handler = rest()
    _, status, _, body = await call(handler, "POST", "/v2/models/nope/infer", b"garbage")
    assert status == 404 and "nope" in orjson.loads(body)["error"]
    _, status, headers, _ = await call(handler, "GET", "/v2/models/ident/infer")
    assert status == 405 and headers[b"allow"] == b"POST"
    _, status, headers, _ = await call(handler, "POST", "/v2/models/ident")
    assert status == 405 and headers[b"allow"] == b"GET, HEAD"
    _, status, _, body = await call(handler, "POST", "/v2/models/ident/infer", b"{bad")
    assert status == 400 and "malformed JSON" in orjson.loads(body)["error"]
    _, status, _, _ = await call(
        handler,
        "POST",
        "/v2/models/ident/infer",
        b"{}",
        [(b"inference-header-content-length", b"x1")],
    )
    assert status == 400
    _, status, _, _ = await call(handler, "GET", "/v2/models/ident/stats")
    assert status == 404
    assert (await call(handler, "GET", "/v1/models"))[0] is False


async def test_rest_metadata_and_health() -> None:
    handler = rest()
    _, status, _, body = await call(handler, "GET", "/v2/models/ident")
    assert status == 200
    assert orjson.loads(body) == {
        "name": "ident",
        "versions": ["1"],
        "platform": "onnxruntime",
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, 4]}],
        "parameters": {"max_batch_size": 8, "execution_providers": []},
    }
    _, status, _, body = await call(handler, "GET", "/v2")
    assert status == 200 and orjson.loads(body)["name"] == "agentd"
    assert (await call(handler, "GET", "/v2/health/live"))[1] == 200
    assert (await call(handler, "GET", "/v2/health/ready"))[1] == 400  # the fake is not ready
    assert (await call(handler, "GET", "/v2/models/ident/ready"))[1] == 200
    assert (await call(handler, "GET", "/v2/models/nope/ready"))[1] == 404
    _, status, headers, body = await call(handler, "HEAD", "/v2/models/ident")
    assert status == 200 and body == b"" and int(headers[b"content-length"]) > 0


def test_codec_modules_do_not_load_agentds_inference_protobufs() -> None:
    # A fresh interpreter: this process's modules depend on which tests ran before.
    script = (
        "import sys, agentd.gateway.kserve, agentd.gateway.kserve.rest;"
        "assert 'agentd.kserve.v2.grpc_service_pb2' not in sys.modules, 'pb2 loaded'"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
