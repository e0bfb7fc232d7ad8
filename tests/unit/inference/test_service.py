"""InferenceService over real ONNX Runtime sessions of small generated models."""

from __future__ import annotations

import asyncio

import numpy as np
import onnxruntime as ort
import pytest

from agentd.errors import DeadlineExceeded, InvalidArgument, NotFound, Unavailable
from agentd.inference import DataType, InferenceService, ModelRepository, ModelState
from agentd.inference.onnx_runtime import OnnxLoader
from agentd.testing.models import write_identity_model, write_mlp_model


@pytest.fixture
def repo_dir(tmp_path):
    write_mlp_model(tmp_path, "mlp", max_queue_delay_us=5000)
    write_identity_model(tmp_path, "ident_fp32", DataType.FP32)
    write_identity_model(tmp_path, "ident_bytes", DataType.BYTES)
    write_identity_model(tmp_path, "flat_int8", DataType.INT8, max_batch_size=0)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"this is not an onnx model")
    return tmp_path


@pytest.fixture
async def service(repo_dir):
    svc = InferenceService(ModelRepository([OnnxLoader()], [repo_dir]))
    await svc.start()
    yield svc
    await svc.aclose()


async def test_outputs_equal_direct_onnxruntime(service, repo_dir):
    x = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    got = await service.infer("mlp", {"input": x})
    session = ort.InferenceSession(str(repo_dir / "mlp" / "model.onnx"))
    (expected,) = session.run(None, {"input": x})
    np.testing.assert_allclose(got["output"], expected, rtol=1e-6)


async def test_corrupt_model_fails_alone(service):
    states = {e.name: e.state for e in service.index()}
    assert states["broken"] is ModelState.FAILED
    assert states["mlp"] is ModelState.READY
    with pytest.raises(Unavailable, match="not a loadable ONNX model"):
        await service.infer("broken", {})


async def test_metadata_has_batch_dim_and_providers(service):
    meta = service.metadata("mlp")
    assert meta.inputs[0].shape == (-1, 16)
    assert meta.inputs[0].datatype is DataType.FP32
    assert meta.max_batch_size == 64
    assert "CPUExecutionProvider" in meta.execution_providers
    flat = service.metadata("flat_int8")
    assert flat.inputs[0].shape == (4,)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"input": np.zeros((2, 16), np.float64)}, "expected datatype FP32, got FP64"),
        ({"input": np.zeros((2, 15), np.float32)}, r"expected shape \[-1, 16\], got \[2, 15\]"),
        ({"input": np.zeros((65, 16), np.float32)}, "outside 1..64"),
        ({}, "missing input 'input'"),
        ({"input": np.zeros((1, 16), np.float32), "x": np.zeros(1)}, "has no input 'x'"),
    ],
)
async def test_invalid_inputs_name_the_tensor(service, inputs, message):
    with pytest.raises(InvalidArgument, match=message):
        await service.infer("mlp", inputs)


async def test_unknown_model_and_version(service):
    with pytest.raises(NotFound):
        await service.infer("ghost", {})
    with pytest.raises(NotFound, match="no version"):
        service.metadata("mlp", "7")
    with pytest.raises(InvalidArgument, match="no output"):
        await service.infer("mlp", {"input": np.zeros((1, 16), np.float32)}, outputs=["nope"])


async def test_bytes_roundtrip_and_unbatched(service):
    words = np.array([[b"a", b"bc", "é".encode(), b""]], dtype=object)
    got = await service.infer("ident_bytes", {"INPUT0": words})
    assert got["OUTPUT0"].tolist() == words.tolist()
    with pytest.raises(InvalidArgument, match="not UTF-8"):
        await service.infer("ident_bytes", {"INPUT0": np.array([[b"\xff"] * 4], dtype=object)})
    flat = np.array([1, -2, 3, 127], np.int8)
    np.testing.assert_array_equal(
        (await service.infer("flat_int8", {"INPUT0": flat}))["OUTPUT0"], flat
    )


async def test_concurrent_calls_are_batched(service):
    xs = [np.full((1, 16), i, np.float32) for i in range(40)]
    results = await asyncio.gather(*(service.infer("mlp", {"input": x}) for x in xs))
    stats = service.batcher("mlp").stats
    assert stats.runs < 40
    direct = await service.infer("mlp", {"input": np.concatenate(xs)})
    np.testing.assert_allclose(
        np.concatenate([r["output"] for r in results]), direct["output"], rtol=1e-5
    )


async def test_deadline(service):
    with pytest.raises(DeadlineExceeded):
        await service.infer("mlp", {"input": np.zeros((1, 16), np.float32)}, timeout=1e-9)


async def test_unload_and_load(service):
    await service.unload("mlp")
    assert not service.is_ready("mlp")
    with pytest.raises(Unavailable):
        await service.infer("mlp", {"input": np.zeros((1, 16), np.float32)})
    await service.load("mlp")
    assert service.is_ready("mlp")


def test_zero_copy_input_binding(repo_dir):
    """Request bytes -> numpy view -> OrtValue bound to the session: one buffer throughout."""
    from agentd.inference.config import load_model_config

    config = load_model_config(repo_dir / "mlp" / "config.yaml", "mlp")
    executor = OnnxLoader().load(repo_dir / "mlp", config)
    body = bytearray(np.arange(32, dtype=np.float32).tobytes())  # e.g. a request body
    view = np.frombuffer(body, dtype=np.float32).reshape(2, 16)
    _binding, values = executor.bind_inputs({"input": view})
    assert np.shares_memory(view, np.frombuffer(body, dtype=np.float32))
    assert values[0].data_ptr() == view.ctypes.data  # the session reads the request's bytes
    out = executor.run({"input": view})["output"]
    assert out.shape == (2, 4)


def test_a_config_path_that_is_a_folder_is_refused(tmp_path):
    from agentd.inference.config import load_model_config

    (tmp_path / "config.yaml").mkdir()
    with pytest.raises(InvalidArgument, match="must be a file"):
        load_model_config(tmp_path / "config.yaml", "m")
    # An absent config still means defaults.
    assert load_model_config(tmp_path / "absent.yaml", "m").name == "m"
