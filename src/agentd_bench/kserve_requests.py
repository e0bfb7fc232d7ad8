"""KServe v2 (Open Inference Protocol) requests for the inference benchmark.

Builds the bytes h2load sends (a framed gRPC ``ModelInferRequest`` with ``raw_input_contents``,
a JSON REST body, a REST body with the binary tensor data extension) and checks, with one real
call per server and protocol, that a server answers the numbers a direct onnxruntime run gives.

The gRPC messages come from tritonclient's generated ``service_pb2``, which is wire-identical to
the KServe v2 proto. agentd's own KServe modules are deliberately not imported here: both
register the ``inference.*`` message names in protobuf's default pool, and loading both in one
process fails.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agentd_bench.echo import grpc_frame
from agentd_bench.errors import BenchError

__all__ = [
    "GRPC_HEADERS",
    "GRPC_INFER_PATH",
    "JSON_HEADERS",
    "CheckError",
    "Workload",
    "expected_outputs",
    "grpc_body",
    "infer_path",
    "rest_binary_body",
    "rest_json_body",
    "verify_grpc",
    "verify_rest",
]

GRPC_INFER_PATH = "/inference.GRPCInferenceService/ModelInfer"
GRPC_HEADERS = {"content-type": "application/grpc", "te": "trailers"}
JSON_HEADERS = {"content-type": "application/json"}
BINARY_HEADER = "Inference-Header-Content-Length"

# Servers batch rows together, and a GEMM over a batch may sum in another order than over one
# row; the results agree to float32 rounding, not bit for bit.
RTOL = 1e-4
ATOL = 1e-5


class CheckError(BenchError):
    """A server did not answer an inference request with the expected numbers."""


@dataclass(frozen=True, slots=True)
class Workload:
    """One model and the single row every benchmark request sends to it (FP32, batch 1)."""

    model: str
    model_path: Path  # the .onnx file, for the reference run
    input_name: str
    width: int  # elements per row
    seed: int = 0
    row: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Seeded values in a normal range: zeros or NaNs could hit fast paths in a kernel.
        rng = np.random.default_rng(self.seed)
        row = rng.standard_normal((1, self.width)).astype(np.float32)
        object.__setattr__(self, "row", row)


def infer_path(model: str) -> str:
    return f"/v2/models/{model}/infer"


def expected_outputs(workload: Workload) -> dict[str, np.ndarray]:
    """Every output of the model for ``workload.row``, from a plain onnxruntime session."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(workload.model_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, {workload.input_name: workload.row})
    return {name: np.asarray(v) for name, v in zip(names, values, strict=True)}


# ---------------------------------------------------------------- request bodies


def grpc_body(workload: Workload) -> bytes:
    """A framed ``ModelInferRequest`` carrying the row as raw little-endian bytes."""
    from tritonclient.grpc import service_pb2 as pb

    request = pb.ModelInferRequest(model_name=workload.model)
    tensor = request.inputs.add()
    tensor.name = workload.input_name
    tensor.datatype = "FP32"
    tensor.shape.extend(workload.row.shape)
    request.raw_input_contents.append(workload.row.astype("<f4").tobytes())
    return grpc_frame(request.SerializeToString())


def rest_json_body(workload: Workload) -> bytes:
    """``{"inputs": [{name, shape, datatype, data}]}`` with the row's values as JSON numbers.

    float32 values printed as Python floats parse back to the same float32.
    """
    doc = {
        "inputs": [
            {
                "name": workload.input_name,
                "shape": list(workload.row.shape),
                "datatype": "FP32",
                "data": workload.row.ravel().tolist(),
            }
        ]
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def rest_binary_body(workload: Workload) -> tuple[bytes, dict[str, str]]:
    """The binary tensor data extension: a JSON header, then the raw tensor bytes.

    Outputs are not requested in binary, so the reply is plain JSON and checked the same way.
    """
    raw = workload.row.astype("<f4").tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": workload.input_name,
                    "shape": list(workload.row.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        },
        separators=(",", ":"),
    ).encode()
    headers = {"content-type": "application/octet-stream", BINARY_HEADER: str(len(header))}
    return header + raw, headers


# ---------------------------------------------------------------- one-shot checks


def _compare(where: str, got: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> None:
    for name, want in expected.items():
        have = got.get(name)
        if have is None:
            raise CheckError(f"{where}: output {name!r} missing (got {sorted(got)})")
        # Shapes may differ by a trailing 1 (MLServer reports a [batch] output as [batch, 1]).
        if have.size != want.size or not np.allclose(
            have.reshape(want.shape).astype(want.dtype), want, rtol=RTOL, atol=ATOL
        ):
            raise CheckError(
                f"{where}: output {name!r} is {have.ravel()[:8].tolist()}, "
                f"onnxruntime gives {want.ravel()[:8].tolist()}"
            )


def verify_grpc(
    port: int,
    workload: Workload,
    expected: Mapping[str, np.ndarray],
    timeout: float = 30.0,
) -> None:
    """One ModelInfer call with tritonclient (a stock KServe v2 client), raw input contents."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    where = f"gRPC ModelInfer {workload.model!r} on port {port}"
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        tensor = grpcclient.InferInput(workload.input_name, list(workload.row.shape), "FP32")
        tensor.set_data_from_numpy(workload.row)
        end = time.monotonic() + timeout
        while True:
            try:
                result = client.infer(workload.model, [tensor], client_timeout=10)
                break
            except InferenceServerException as exc:
                # UNAVAILABLE while a server finishes starting; anything else is a real failure.
                if "UNAVAILABLE" not in str(exc.status()) or time.monotonic() > end:
                    raise CheckError(f"{where} failed: {exc}") from None
                time.sleep(0.1)
        got = {name: result.as_numpy(name) for name in expected}
        _compare(where, {k: v for k, v in got.items() if v is not None}, expected)
    finally:
        client.close()


def verify_rest(
    port: int,
    workload: Workload,
    body: bytes,
    headers: Mapping[str, str],
    expected: Mapping[str, np.ndarray],
) -> None:
    """POST exactly the body the load will send; the JSON reply must carry the expected numbers."""
    where = f"REST infer {workload.model!r} on port {port}"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", infer_path(workload.model), body=body, headers=dict(headers))
        response = conn.getresponse()
        raw = response.read()
    except OSError as exc:
        raise CheckError(f"{where} failed: {exc}") from exc
    finally:
        conn.close()
    if response.status != 200:
        raise CheckError(f"{where}: status {response.status}, body {raw[:300]!r}")
    try:
        outputs = json.loads(raw)["outputs"]
        got = {o["name"]: np.asarray(o["data"]) for o in outputs}
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckError(f"{where}: unexpected reply {raw[:300]!r}") from exc
    _compare(where, got, expected)
