"""The built-in ``decision`` model as shipped in the package, and the MLP benchmark generator."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from importlib.resources import files
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml

from agentd.inference.types import DataType

SCRIPTS = Path(__file__).resolve().parents[3] / "scripts"
MODEL_DIR = files("agentd.models") / "decision"
ORT_TYPES = {"tensor(float)": DataType.FP32, "tensor(int64)": DataType.INT64}


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered before running: dataclasses look their module up in sys.modules.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trainer() -> ModuleType:
    return load_script("train_decision_model")


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return yaml.safe_load((MODEL_DIR / "config.yaml").read_text())


@pytest.fixture(scope="module")
def session() -> Any:
    model = (MODEL_DIR / "model.onnx").read_bytes()
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


def test_config_describes_the_model(config: dict[str, Any]) -> None:
    assert config["name"] == "decision"
    assert config["version"] == "1"
    assert config["platform"] == "onnxruntime"
    assert config["max_batch_size"] == 4096
    assert config["dynamic_batching"] == {"max_queue_delay_us": 500, "max_queue_size": 65536}
    assert config["labels"] == ["wait", "explore", "exploit", "retreat"]
    assert config["extra"]["quantization"]["method"] == "static QDQ int8"


def test_accuracy_matches_recorded(
    trainer: ModuleType, session: Any, config: dict[str, Any]
) -> None:
    recorded = config["extra"]["accuracy"]
    seed = config["extra"]["training"]["seed"]
    assert recorded["test_seed"] == seed + trainer.TEST_SEED_OFFSET
    x, y = trainer.make_dataset(recorded["test_samples"], recorded["test_seed"])

    (action,) = session.run(["action"], {"features": x})
    accuracy = float((action == y).mean())

    assert accuracy == pytest.approx(recorded["int8"], abs=0.005)
    # Chance is 0.25 and the most common action about 0.29: the model has learned the rule.
    assert accuracy > 0.9
    assert recorded["fp32"] - recorded["int8"] < 0.01  # quantization costs little
    assert recorded["agreement"] > 0.98


def test_signature_matches_config(session: Any, config: dict[str, Any]) -> None:
    for actual, declared in (
        (session.get_inputs(), config["inputs"]),
        (session.get_outputs(), config["outputs"]),
    ):
        assert [t.name for t in actual] == [d["name"] for d in declared]
        for tensor, spec in zip(actual, declared, strict=True):
            assert ORT_TYPES[tensor.type] is DataType.parse(spec["datatype"])
            batch, *shape = tensor.shape
            assert isinstance(batch, str), "the batch dimension must be symbolic"
            assert shape == spec["shape"]
    assert config["outputs"][0]["shape"] == [len(config["labels"])]


@pytest.mark.parametrize("batch", [1, 1000, 4096])
def test_batches(session: Any, batch: int) -> None:
    x = np.random.default_rng(batch).random((batch, 16), dtype=np.float32)

    probabilities, action = session.run(["probabilities", "action"], {"features": x})

    assert probabilities.shape == (batch, 4) and probabilities.dtype == np.float32
    assert action.shape == (batch,) and action.dtype == np.int64
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(action, probabilities.argmax(axis=1))


def test_graph_is_quantized_to_int8() -> None:
    data = (MODEL_DIR / "model.onnx").read_bytes()
    assert len(data) < 100_000
    graph = onnx.load_from_string(data).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops

    initializers = {init.name: init for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    int8 = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
    gemms = [node for node in graph.node if node.op_type in ("Gemm", "MatMul")]
    assert len(gemms) == 3
    for node in gemms:
        # Every layer's weight is an int8 tensor, dequantized on the way in.
        weight = producers[node.input[1]]
        assert weight.op_type == "DequantizeLinear"
        assert initializers[weight.input[0]].data_type in int8
        # ...and so is its activation input.
        assert producers[node.input[0]].op_type == "DequantizeLinear"
    float_weights = [
        init.name
        for init in graph.initializer
        if init.data_type == onnx.TensorProto.FLOAT and len(init.dims) == 2
    ]
    assert float_weights == [], "no fp32 weight matrix should be left"


def test_make_mlp_model(tmp_path: Path) -> None:
    out = tmp_path / "mlp"
    args = ["--inputs", "8", "--hidden", "16", "--layers", "2", "--outputs", "3", "-o", str(out)]
    subprocess.run(
        [sys.executable, str(SCRIPTS / "make_mlp_model.py"), *args],
        check=True,
        capture_output=True,
        timeout=60,
    )

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["name"] == "mlp"
    assert config["max_batch_size"] == 256
    assert config["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [8]}]
    assert config["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [3]}]

    mlp = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (y,) = mlp.run(["output"], {"input": np.ones((5, 8), dtype=np.float32)})
    assert y.shape == (5, 3) and y.dtype == np.float32
    assert np.isfinite(y).all() and y.std() > 0
    assert sum(node.op_type == "Gemm" for node in onnx.load(out / "model.onnx").graph.node) == 3
