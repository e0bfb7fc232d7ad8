"""KServe v2 tensor codecs: JSON values, raw bytes and gRPC typed contents <-> numpy.

Pure numpy: no protobuf and no HTTP, so the decoders can be fuzzed in any process. Every
decoder either returns an array or raises :class:`~agentd.errors.InvalidArgument` with a
message that names the tensor and says what was expected and what arrived.

Wire layout of raw bytes (the REST binary extension and gRPC ``raw_*_contents``): elements in
row-major order, little-endian; BOOL is one byte (0 or 1); BYTES elements are each prefixed
by a 4-byte little-endian length.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from agentd.errors import Internal, InvalidArgument
from agentd.inference.types import DataType

__all__ = [
    "CONTENTS_FIELD",
    "MAX_DIMS",
    "MAX_ELEMENTS",
    "datatype_of",
    "decode_contents",
    "decode_json",
    "decode_raw",
    "encode_raw",
    "json_data",
    "parse_datatype",
    "parse_shape",
]

# Far above any real request (the body limit binds first) but low enough that a lying shape
# can never make numpy reserve memory or overflow an index.
MAX_DIMS = 32
MAX_ELEMENTS = 1 << 31

# The typed ``InferTensorContents`` field each datatype travels in; FP16 has none.
CONTENTS_FIELD: dict[DataType, str | None] = {
    DataType.BOOL: "bool_contents",
    DataType.UINT8: "uint_contents",
    DataType.UINT16: "uint_contents",
    DataType.UINT32: "uint_contents",
    DataType.UINT64: "uint64_contents",
    DataType.INT8: "int_contents",
    DataType.INT16: "int_contents",
    DataType.INT32: "int_contents",
    DataType.INT64: "int64_contents",
    DataType.FP16: None,
    DataType.FP32: "fp32_contents",
    DataType.FP64: "fp64_contents",
    DataType.BYTES: "bytes_contents",
}

_WIRE: dict[DataType, np.dtype] = {
    dt: dt.numpy.newbyteorder("<") for dt in DataType if dt is not DataType.BYTES
}
_LENGTH = struct.Struct("<I")
# Python types a JSON or protobuf value may have, per numpy kind. bool is a subclass of
# int, so exact types are compared: `true` is not an integer and 1 is not a boolean.
_ALLOWED: dict[str, tuple[frozenset[type], str]] = {
    "b": (frozenset({bool}), "true or false"),
    "i": (frozenset({int}), "integers"),
    "u": (frozenset({int}), "integers"),
    "f": (frozenset({int, float}), "numbers"),
}


def parse_datatype(tensor: str, datatype: object) -> DataType:
    if not isinstance(datatype, str):
        raise InvalidArgument(
            f"tensor {tensor!r}: datatype must be a string, got {_show(datatype)}"
        )
    try:
        return DataType(datatype)
    except ValueError:
        known = ", ".join(d.value for d in DataType)
        raise InvalidArgument(
            f"tensor {tensor!r}: unknown datatype {_show(datatype)}; expected one of {known}"
        ) from None


def parse_shape(tensor: str, shape: object) -> tuple[int, ...]:
    """A shape as sent by a client: a list of non-negative ints, within the caps."""
    if not isinstance(shape, list | tuple):
        raise InvalidArgument(f"tensor {tensor!r}: shape must be a list of integers")
    dims = list(shape)
    if len(dims) > MAX_DIMS:
        raise InvalidArgument(
            f"tensor {tensor!r}: shape has {len(dims)} dimensions, at most {MAX_DIMS} allowed"
        )
    for dim in dims:
        # bool is an int in Python, but `true` is not a dimension.
        if type(dim) is not int or dim < 0:
            raise InvalidArgument(
                f"tensor {tensor!r}: shape {_show(dims)} must hold non-negative integers"
            )
        if dim > MAX_ELEMENTS:
            raise InvalidArgument(
                f"tensor {tensor!r}: shape {dims}: dimension {dim} exceeds the limit of "
                f"{MAX_ELEMENTS}"
            )
    count = math.prod(dims)
    if count > MAX_ELEMENTS:
        raise InvalidArgument(
            f"tensor {tensor!r}: shape {dims} has {count} elements, "
            f"more than the limit of {MAX_ELEMENTS}"
        )
    # An empty shape is still a shape numpy must lay out: its other dimensions must fit
    # (numpy refuses [2**31, 2**31, 0] as "too big", which was a 500).
    spread = math.prod(d for d in dims if d)
    if count == 0 and spread > MAX_ELEMENTS:
        raise InvalidArgument(
            f"tensor {tensor!r}: shape {dims} has no elements, but its non-zero dimensions "
            f"multiply to {spread}, more than the limit of {MAX_ELEMENTS}"
        )
    return tuple(dims)


# -- JSON ----------------------------------------------------------------------------------


def decode_json(tensor: str, datatype: object, shape: object, data: object) -> np.ndarray:
    """Decode the ``data`` of a KServe REST tensor: a flat or nested list, row-major.

    BYTES elements are strings and become their UTF-8 bytes.
    """
    dtype = parse_datatype(tensor, datatype)
    dims = parse_shape(tensor, shape)
    if not isinstance(data, list):
        raise InvalidArgument(
            f"tensor {tensor!r}: data must be a JSON array, got {type(data).__name__}"
        )
    values = _flatten(data)
    _check_count(tensor, dims, len(values))
    if dtype is DataType.BYTES:
        return _bytes_array(tensor, dims, values, str)
    return _scalars(tensor, dtype, values).reshape(dims)


def _flatten(data: list[Any]) -> list[Any]:
    if list not in set(map(type, data)):
        return data
    # Iterative, so nesting depth cannot exhaust the Python stack.
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if type(item) is list:
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def json_data(array: np.ndarray) -> np.ndarray | list[Any]:
    """The flat ``data`` of an output tensor, for ``orjson.dumps(OPT_SERIALIZE_NUMPY)``.

    Numeric arrays are handed to orjson as they are (it writes them in C); BYTES become
    strings, which fails with InvalidArgument for elements that are not UTF-8 (those need
    the binary extension).
    """
    dtype = datatype_of(array)
    if dtype is DataType.BYTES:
        out: list[Any] = []
        for index, item in enumerate(array.reshape(-1).tolist()):
            if isinstance(item, str):
                out.append(item)
                continue
            try:
                out.append(_element_bytes(item).decode())
            except UnicodeDecodeError:
                raise InvalidArgument(
                    f"output element {index} is not UTF-8 text; request the output with "
                    "parameters.binary_data=true"
                ) from None
        return out
    flat = array.reshape(-1)
    if not flat.dtype.isnative or not flat.flags.c_contiguous:
        flat = np.ascontiguousarray(flat, dtype=dtype.numpy)
    return flat


# -- raw bytes -----------------------------------------------------------------------------


def decode_raw(
    tensor: str, datatype: object, shape: object, buffer: bytes | bytearray | memoryview
) -> np.ndarray:
    """Decode raw tensor bytes. Fixed-size types are a read-only view over ``buffer``."""
    dtype = parse_datatype(tensor, datatype)
    dims = parse_shape(tensor, shape)
    view = memoryview(buffer)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    count = math.prod(dims)
    if dtype is DataType.BYTES:
        return _decode_length_prefixed(tensor, dims, count, view)
    wire = _WIRE[dtype]
    expected = count * wire.itemsize
    if view.nbytes != expected:
        raise InvalidArgument(
            f"tensor {tensor!r}: expected {expected} bytes for {count} {dtype.value} elements "
            f"(shape {list(dims)}), got {view.nbytes}"
        )
    if dtype is DataType.BOOL and count and np.frombuffer(view, np.uint8).max() > 1:
        raise InvalidArgument(f"tensor {tensor!r}: BOOL bytes must be 0 or 1")
    array = np.frombuffer(view, dtype=wire, count=count)
    if not wire.isnative:  # big-endian hosts only
        array = array.astype(dtype.numpy)
    return array.reshape(dims)


def _decode_length_prefixed(
    tensor: str, dims: tuple[int, ...], count: int, view: memoryview
) -> np.ndarray:
    size = view.nbytes
    # Each element needs its 4-byte prefix: refuse before allocating anything for `count`.
    if count * _LENGTH.size > size:
        raise InvalidArgument(
            f"tensor {tensor!r}: {count} BYTES elements need at least {count * _LENGTH.size} "
            f"bytes of length prefixes, got {size} bytes"
        )
    out = np.empty(count, dtype=object)
    offset = 0
    for index in range(count):
        if offset + _LENGTH.size > size:
            raise InvalidArgument(
                f"tensor {tensor!r}: BYTES element {index} of {count} has no length prefix "
                f"(data ends at byte {size})"
            )
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += _LENGTH.size
        end = offset + length
        if end > size:
            raise InvalidArgument(
                f"tensor {tensor!r}: BYTES element {index} declares {length} bytes but only "
                f"{size - offset} remain"
            )
        out[index] = view[offset:end].tobytes()
        offset = end
    if offset != size:
        raise InvalidArgument(
            f"tensor {tensor!r}: {size - offset} bytes left over after {count} BYTES elements "
            f"(shape {list(dims)})"
        )
    return out.reshape(dims)


def encode_raw(array: np.ndarray) -> bytes:
    """Raw wire bytes of ``array`` (row-major, little-endian; BYTES length-prefixed)."""
    dtype = datatype_of(array)
    if dtype is DataType.BYTES:
        parts: list[bytes] = []
        for item in array.reshape(-1).tolist():
            data = _element_bytes(item)
            parts.append(_LENGTH.pack(len(data)))
            parts.append(data)
        return b"".join(parts)
    return array.astype(_WIRE[dtype], copy=False).tobytes()


# -- gRPC typed contents -------------------------------------------------------------------


def decode_contents(
    tensor: str, datatype: object, shape: object, fields: Mapping[str, Sequence[Any]]
) -> np.ndarray:
    """Decode gRPC ``InferTensorContents``, given as ``{field name: values}``.

    Pass every populated field so that values in the wrong field are reported, not ignored.
    """
    dtype = parse_datatype(tensor, datatype)
    dims = parse_shape(tensor, shape)
    want = CONTENTS_FIELD[dtype]
    if want is None:
        raise InvalidArgument(
            f"tensor {tensor!r}: {dtype.value} has no typed contents field; "
            "send it in raw_input_contents"
        )
    for name, values in fields.items():
        if name != want and len(values):
            raise InvalidArgument(
                f"tensor {tensor!r}: datatype {dtype.value} expects values in {want}, got {name}"
            )
    values = list(fields.get(want, ()))
    _check_count(tensor, dims, len(values))
    if dtype is DataType.BYTES:
        return _bytes_array(tensor, dims, values, bytes)
    return _scalars(tensor, dtype, values).reshape(dims)


# -- shared --------------------------------------------------------------------------------


def datatype_of(array: np.ndarray) -> DataType:
    """The KServe datatype of an output array; Internal for a type the protocol lacks."""
    try:
        return DataType.from_numpy(array.dtype)
    except ValueError as exc:
        raise Internal(f"model produced an unsupported tensor type: {exc}") from None


def _check_count(tensor: str, dims: tuple[int, ...], got: int) -> None:
    expected = math.prod(dims)
    if got != expected:
        raise InvalidArgument(
            f"tensor {tensor!r}: shape {list(dims)} needs {expected} elements, got {got}"
        )


def _scalars(tensor: str, dtype: DataType, values: list[Any]) -> np.ndarray:
    """Numbers or booleans to a 1-D array of ``dtype``, refusing values that do not fit."""
    target = dtype.numpy
    allowed, kind = _ALLOWED[target.kind]
    if not set(map(type, values)) <= allowed:
        bad = next(v for v in values if type(v) not in allowed)
        raise InvalidArgument(
            f"tensor {tensor!r}: {dtype.value} values must be {kind}, got {_show(bad)}"
        )
    if target.kind == "f":
        return _floats(tensor, dtype, values)
    try:
        return np.array(values, dtype=target)
    except OverflowError:
        # Only integer kinds overflow here: booleans always fit.
        info = np.iinfo(target)
        bad = next((v for v in values if not info.min <= v <= info.max), None)
        raise InvalidArgument(
            f"tensor {tensor!r}: value {_show(bad)} does not fit {dtype.value} "
            f"({info.min}..{info.max})"
        ) from None


def _floats(tensor: str, dtype: DataType, values: list[Any]) -> np.ndarray:
    try:
        wide = np.array(values, dtype=np.float64)
    except OverflowError:
        raise InvalidArgument(
            f"tensor {tensor!r}: an integer value is too large for {dtype.value}"
        ) from None
    if dtype is DataType.FP64:
        return wide
    with np.errstate(over="ignore"):
        narrow = wide.astype(dtype.numpy)
    overflow = np.isfinite(wide) & ~np.isfinite(narrow)
    if overflow.any():
        bad = float(wide[np.argmax(overflow)])
        raise InvalidArgument(
            f"tensor {tensor!r}: value {bad!r} is outside the range of {dtype.value} "
            f"(±{float(np.finfo(dtype.numpy).max)})"
        )
    return narrow


def _bytes_array(tensor: str, dims: tuple[int, ...], values: list[Any], kind: type) -> np.ndarray:
    """BYTES elements: UTF-8 strings from JSON, bytes from gRPC contents."""
    if not set(map(type, values)) <= {kind}:
        bad = next(v for v in values if type(v) is not kind)
        what = "strings" if kind is str else "bytes"
        raise InvalidArgument(f"tensor {tensor!r}: BYTES values must be {what}, got {_show(bad)}")
    out = np.empty(len(values), dtype=object)
    if kind is str:
        try:
            out[:] = [v.encode() for v in values]
        except UnicodeEncodeError as exc:
            raise InvalidArgument(
                f"tensor {tensor!r}: a BYTES string is not valid text: {exc.reason}"
            ) from None
    else:
        out[:] = values
    return out.reshape(dims)


def _element_bytes(item: object) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode()
    if isinstance(item, bytearray | memoryview):
        return bytes(item)
    raise Internal(f"model produced a BYTES element of type {type(item).__name__}")


def _show(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
