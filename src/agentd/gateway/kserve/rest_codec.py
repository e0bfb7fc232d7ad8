"""The KServe v2 REST inference documents: request and response bodies, JSON or binary.

Bytes in, plain values out (no HTTP here). With the binary tensor data extension a body is a
JSON header of ``Inference-Header-Content-Length`` bytes followed by the tensors' raw bytes,
in the order of the inputs (or outputs) that carry ``parameters.binary_data_size``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from agentd.errors import InvalidArgument
from agentd.gateway.kserve.codec import (
    datatype_of,
    decode_json,
    decode_raw,
    encode_raw,
    json_data,
)

__all__ = ["InferRequest", "RequestedOutput", "decode_request", "encode_response"]

# Extensions agentd does not implement: refuse them rather than silently ignore a request
# that expects shared memory or top-k classification.
_UNSUPPORTED_INPUT = ("shared_memory_region",)
_UNSUPPORTED_OUTPUT = ("shared_memory_region", "classification")


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    name: str
    binary: bool | None  # None: the request-level default decides


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A decoded ``POST .../infer`` body. Input arrays may be read-only views of the body."""

    inputs: dict[str, np.ndarray]
    outputs: tuple[RequestedOutput, ...] | None  # None: every output of the model
    binary_outputs: bool  # request-level ``binary_data_output``: the default per output
    id: str | None = None
    timeout_s: float | None = None  # request-level ``timeout`` (microseconds on the wire; 0: none)

    @property
    def output_names(self) -> list[str] | None:
        return None if self.outputs is None else [o.name for o in self.outputs]


def decode_request(body: bytes, header_length: int | None) -> InferRequest:
    """Parse an inference request body; ``header_length`` is the binary extension's header.

    Raises InvalidArgument naming the field or tensor that is wrong.
    """
    view = memoryview(body)
    if header_length is None:
        head, binary = view, view[:0]
    else:
        if not 0 <= header_length <= len(view):
            raise InvalidArgument(
                f"Inference-Header-Content-Length {header_length} is outside the "
                f"{len(view)}-byte body"
            )
        head, binary = view[:header_length], view[header_length:]
    try:
        doc = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(f"malformed JSON request: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidArgument("malformed JSON request: expected an object")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidArgument("'id' must be a string")
    params = _parameters(doc.get("parameters"), "request")
    binary_outputs = params.get("binary_data_output", False)
    if not isinstance(binary_outputs, bool):
        raise InvalidArgument("parameter 'binary_data_output' must be true or false")
    return InferRequest(
        inputs=_inputs(doc.get("inputs"), binary, header_length is not None),
        outputs=_outputs(doc.get("outputs")),
        binary_outputs=binary_outputs,
        id=request_id,
        timeout_s=_timeout(params.get("timeout")),
    )


def _inputs(raw: object, binary: memoryview, has_binary: bool) -> dict[str, np.ndarray]:
    if not isinstance(raw, list):
        raise InvalidArgument("'inputs' must be a list of tensors")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for index, tensor in enumerate(raw):
        if not isinstance(tensor, dict):
            raise InvalidArgument(f"inputs[{index}] must be an object")
        name = tensor.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"inputs[{index}] needs a non-empty string 'name'")
        if name in inputs:
            raise InvalidArgument(f"input {name!r} is given twice")
        params = _parameters(tensor.get("parameters"), f"input {name!r}")
        _refuse(params, _UNSUPPORTED_INPUT, f"input {name!r}")
        size = params.get("binary_data_size")
        datatype, shape = tensor.get("datatype"), tensor.get("shape")
        if size is None:
            if "data" not in tensor:
                raise InvalidArgument(f"input {name!r} has neither 'data' nor binary_data_size")
            inputs[name] = decode_json(name, datatype, shape, tensor["data"])
            continue
        if "data" in tensor:
            raise InvalidArgument(f"input {name!r} has both 'data' and binary_data_size")
        if type(size) is not int or size < 0:
            raise InvalidArgument(f"input {name!r}: binary_data_size must be an integer >= 0")
        if not has_binary:
            raise InvalidArgument(
                f"input {name!r} has binary_data_size but the request has no "
                "Inference-Header-Content-Length header"
            )
        if offset + size > len(binary):
            raise InvalidArgument(
                f"input {name!r}: binary_data_size {size} runs past the end of the binary "
                f"data ({len(binary) - offset} bytes remain)"
            )
        inputs[name] = decode_raw(name, datatype, shape, binary[offset : offset + size])
        offset += size
    if offset != len(binary):
        raise InvalidArgument(
            f"{len(binary) - offset} bytes of binary data follow the inputs' binary_data_size "
            "total; each byte must belong to an input"
        )
    return inputs


def _outputs(raw: object) -> tuple[RequestedOutput, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise InvalidArgument("'outputs' must be a list")
    outputs: list[RequestedOutput] = []
    seen: set[str] = set()
    for index, tensor in enumerate(raw):
        if not isinstance(tensor, dict):
            raise InvalidArgument(f"outputs[{index}] must be an object")
        name = tensor.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"outputs[{index}] needs a non-empty string 'name'")
        if name in seen:
            raise InvalidArgument(f"output {name!r} is requested twice")
        seen.add(name)
        params = _parameters(tensor.get("parameters"), f"output {name!r}")
        _refuse(params, _UNSUPPORTED_OUTPUT, f"output {name!r}")
        binary = params.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise InvalidArgument(f"output {name!r}: binary_data must be true or false")
        outputs.append(RequestedOutput(name, binary))
    return tuple(outputs)


def _parameters(raw: object, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidArgument(f"{where}: 'parameters' must be an object")
    return raw


def _refuse(params: Mapping[str, Any], names: tuple[str, ...], where: str) -> None:
    for name in names:
        if name in params:
            raise InvalidArgument(f"{where}: parameter {name!r} is not supported by agentd")


def _timeout(raw: object) -> float | None:
    if raw is None:
        return None
    if type(raw) is not int or raw < 0:
        raise InvalidArgument("parameter 'timeout' must be an integer number of microseconds")
    # As in Triton, 0 means no request-specific timeout: the server's default applies.
    return raw / 1_000_000 if raw else None


def encode_response(
    model_name: str,
    model_version: str,
    request: InferRequest,
    outputs: Mapping[str, np.ndarray],
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header length when any output is binary.

    Each output is binary when its request said ``binary_data: true``, or when it did not
    say and the request-level ``binary_data_output`` is true.
    """
    binary_by_name = {o.name: o.binary for o in request.outputs or ()}
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, array in outputs.items():
        entry: dict[str, Any] = {
            "name": name,
            "datatype": datatype_of(array).value,
            "shape": list(array.shape),
        }
        binary = binary_by_name.get(name)
        if binary is None:
            binary = request.binary_outputs
        if binary:
            raw = encode_raw(array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            try:
                entry["data"] = json_data(array)
            except InvalidArgument as exc:
                raise InvalidArgument(f"output {name!r}: {exc.message}") from None
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        doc["id"] = request.id
    doc["outputs"] = entries
    head = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)
