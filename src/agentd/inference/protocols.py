"""The plug points of the model layer: loaders turn a source into an executor that runs it.

ONNX Runtime is the main implementation (``onnx_runtime.py``); GGUF (llama-cpp-python) and
HF (transformers) executors plug in behind the same two protocols.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from agentd.inference.types import ModelConfig, ModelMetadata

__all__ = ["ModelLoader", "RuntimeExecutor"]


@runtime_checkable
class RuntimeExecutor(Protocol):
    """A loaded model. ``run`` blocks; callers run it on a thread sized for inference.

    ``run`` must be safe to call from several threads at once (ONNX Runtime sessions are).
    """

    @property
    def metadata(self) -> ModelMetadata: ...

    def run(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run one batch. Input arrays may be read-only views; they are not modified."""
        ...

    def close(self) -> None: ...


class ModelLoader(Protocol):
    """Turns a model source (a file or a folder) into a RuntimeExecutor."""

    platform: str

    def can_load(self, source: Path) -> bool: ...

    def load(self, source: Path, config: ModelConfig) -> RuntimeExecutor:
        """Load and check the model; raise ``agentd.errors.InvalidArgument`` (corrupt or
        unsupported file) or ``FailedPrecondition`` (a missing optional extra)."""
        ...
