"""onnxruntime's errors are wrapped at the boundary: agentd's error tree outside, onnxruntime's
exception kept as ``__cause__``, for tensor models and for the token engine alike."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from agentd.errors import AgentdError, Internal, InvalidArgument
from agentd.generate.onnx_lm import engine_for_session, open_session
from agentd.generate.types import SamplingParams
from agentd.inference import InferenceService, ModelRepository
from agentd.inference.onnx_runtime import OnnxLoader
from agentd.inference.types import ModelConfig
from agentd.models.catalog import builtin_models_dir


def _is_ort_error(exc: BaseException | None) -> bool:
    """onnxruntime's own exception: one of its pybind types (loads), or the RuntimeError
    its runs raise with the failing node's status."""
    if exc is None or isinstance(exc, AgentdError):
        return False
    if type(exc).__module__.startswith("onnxruntime"):
        return True
    return isinstance(exc, RuntimeError) and "Non-zero status code returned" in str(exc)


def _lookup_model(folder: Path) -> None:
    """``table[index]`` over a 4-row table: an index past it fails inside onnxruntime, after
    agentd's checks (right name, type and shape) have passed."""
    folder.mkdir(parents=True)
    table = numpy_helper.from_array(np.arange(4, dtype=np.float32), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "index"], ["value"])],
        "lookup",
        [helper.make_tensor_value_info("index", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("value", TensorProto.FLOAT, [1])],
        [table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(folder / "model.onnx"))


def test_a_run_that_fails_in_onnxruntime_raises_internal_from_it(tmp_path: Path) -> None:
    _lookup_model(tmp_path / "lookup")

    async def main() -> None:
        service = InferenceService(ModelRepository([OnnxLoader(threads=1)], [tmp_path]))
        await service.start()
        try:
            good = await service.infer("lookup", {"index": np.array([2], np.int64)})
            assert good["value"].tolist() == [2.0]
            with pytest.raises(Internal, match="model 'lookup' failed to run") as caught:
                await service.infer("lookup", {"index": np.array([9], np.int64)})
            assert _is_ort_error(caught.value.__cause__)
            # The model keeps serving after a failed run.
            again = await service.infer("lookup", {"index": np.array([1], np.int64)})
            assert again["value"].tolist() == [1.0]
        finally:
            await service.aclose()

    asyncio.run(main())


def test_a_model_onnxruntime_cannot_load_raises_invalid_argument_from_it(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(InvalidArgument, match="not a loadable ONNX model") as caught:
        OnnxLoader(threads=1).load(tmp_path, ModelConfig(name="broken"))
    assert _is_ort_error(caught.value.__cause__)
    with pytest.raises(InvalidArgument, match="not a loadable ONNX model") as caught:
        open_session(tmp_path / "model.onnx", threads=1)
    assert _is_ort_error(caught.value.__cause__)


def _short_rope_lm(path: Path, rows: int) -> None:
    """tinylm with its rotary tables cut to ``rows`` positions: onnxruntime refuses the
    decode step that reaches position ``rows``."""
    graph = onnx.load(str(builtin_models_dir() / "tinylm" / "model.onnx"))
    for table in graph.graph.initializer:
        if table.name in ("rope_cos", "rope_sin"):
            cut = numpy_helper.to_array(table)[:rows].copy()
            table.CopyFrom(numpy_helper.from_array(cut, table.name))
    onnx.save(graph, str(path))


def test_a_failing_decode_step_ends_the_stream_with_internal_from_onnxruntime(
    tmp_path: Path,
) -> None:
    shutil.copy(builtin_models_dir() / "tinylm" / "tokenizer.json", tmp_path)
    _short_rope_lm(tmp_path / "model.onnx", rows=8)
    engine = engine_for_session(
        open_session(tmp_path / "model.onnx", threads=1),
        name="short",
        eos_token_ids=(5,),
        blocks=16,
        block_size=16,
    )

    async def main() -> list[int]:
        tokens: list[int] = []
        try:
            with pytest.raises(Internal, match="model 'short' failed to run") as caught:
                async for token in engine.stream([2, 3, 4], SamplingParams(max_tokens=20)):
                    tokens.append(token)
            assert _is_ort_error(caught.value.__cause__)
        finally:
            await engine.close()
        return tokens

    tokens = asyncio.run(main())
    assert 0 < len(tokens) < 20  # it failed mid-stream, at position 8
    assert engine.pool.free == engine.pool.total  # the failed sequence gave its blocks back
