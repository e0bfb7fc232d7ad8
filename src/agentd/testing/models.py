"""Write small ONNX models and their config.yaml for tests (needs the ``onnx`` package)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from agentd.inference.types import DataType

__all__ = ["write_identity_model", "write_mlp_model"]

_ONNX_TYPE_NAMES = {
    DataType.BOOL: "BOOL",
    DataType.UINT8: "UINT8",
    DataType.UINT16: "UINT16",
    DataType.UINT32: "UINT32",
    DataType.UINT64: "UINT64",
    DataType.INT8: "INT8",
    DataType.INT16: "INT16",
    DataType.INT32: "INT32",
    DataType.INT64: "INT64",
    DataType.FP16: "FLOAT16",
    DataType.FP32: "FLOAT",
    DataType.FP64: "DOUBLE",
    DataType.BYTES: "STRING",
}


def _save(model, folder: Path, config: dict) -> Path:
    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def write_identity_model(
    repository: Path, name: str, datatype: DataType, width: int = 4, max_batch_size: int = 8
) -> Path:
    """``OUTPUT0 = INPUT0`` with shape [batch, width] (or [width] when not batched)."""
    from onnx import TensorProto, helper

    elem = getattr(TensorProto, _ONNX_TYPE_NAMES[datatype])
    dims: list = ["batch", width] if max_batch_size else [width]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        name,
        [helper.make_tensor_value_info("INPUT0", elem, dims)],
        [helper.make_tensor_value_info("OUTPUT0", elem, dims)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return _save(
        model,
        repository / name,
        {
            "name": name,
            "max_batch_size": max_batch_size,
            "inputs": [{"name": "INPUT0", "datatype": datatype.value, "shape": [width]}],
            "outputs": [{"name": "OUTPUT0", "datatype": datatype.value, "shape": [width]}],
        },
    )


def write_mlp_model(
    repository: Path,
    name: str,
    *,
    inputs: int = 16,
    hidden: int = 32,
    outputs: int = 4,
    max_batch_size: int = 64,
    max_queue_delay_us: int = 2000,
    seed: int = 0,
) -> Path:
    """``output = relu(input @ W1 + b1) @ W2 + b2`` with seeded random weights."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights = {
        "W1": rng.standard_normal((inputs, hidden)) / np.sqrt(inputs),
        "b1": rng.standard_normal(hidden) * 0.1,
        "W2": rng.standard_normal((hidden, outputs)) / np.sqrt(hidden),
        "b2": rng.standard_normal(outputs) * 0.1,
    }
    weights = {k: v.astype(np.float32) for k, v in weights.items()}
    nodes = [
        helper.make_node("MatMul", ["input", "W1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "W2"], ["o0"]),
        helper.make_node("Add", ["o0", "b2"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", inputs])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", outputs])],
        initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return _save(
        model,
        repository / name,
        {
            "name": name,
            "max_batch_size": max_batch_size,
            "dynamic_batching": {"max_queue_delay_us": max_queue_delay_us},
        },
    )
