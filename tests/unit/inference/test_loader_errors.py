"""A loader that fails with something other than an agentd error: the load fails with a
reason (Internal, the original chained), the model is FAILED, nothing is left LOADING."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agentd.errors import Internal, Unavailable
from agentd.inference import InferenceService, ModelRepository, ModelState
from agentd.inference.onnx_runtime import OnnxLoader
from agentd.inference.protocols import RuntimeExecutor
from agentd.inference.repository import builtin_models_dir
from agentd.inference.types import ModelConfig


class FlakyLoader(OnnxLoader):
    """The real ONNX loader, failing its first ``failures`` loads of ``decision`` with a
    plain error."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def load(self, source: Path, config: ModelConfig) -> RuntimeExecutor:
        if config.name == "decision" and self.failures:
            self.failures -= 1
            raise RuntimeError("the loader broke")
        return super().load(source, config)


def test_build_wraps_a_plain_error_with_its_cause():
    repository = ModelRepository([FlakyLoader(1)], [builtin_models_dir()])
    repository.scan()
    with pytest.raises(Internal, match="loader failed: RuntimeError: the loader broke") as info:
        repository.build("decision")
    assert isinstance(info.value.__cause__, RuntimeError)


async def test_a_failed_load_leaves_the_model_failed_and_a_reload_serves():
    repository = ModelRepository([FlakyLoader(1)], [builtin_models_dir()])
    service = InferenceService(repository)
    await service.start()  # loads every model: "decision" fails
    try:
        entry = repository.entry("decision")
        assert entry.state is ModelState.FAILED
        assert "the loader broke" in entry.reason
        inputs = {"features": np.zeros((1, 16), dtype=np.float32)}
        with pytest.raises(Unavailable):
            await service.infer("decision", inputs, timeout=5)
        entry = await service.load("decision")
        assert entry.state is ModelState.READY
        result = await service.infer("decision", inputs, timeout=5)
        assert result["probabilities"].shape == (1, 4)
    finally:
        await service.aclose()
