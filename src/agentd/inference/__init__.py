"""Inference: model loaders and executors, dynamic batching, the protocol-neutral service.

The ONNX Runtime adapter lives in ``agentd.inference.onnx_runtime`` and is imported only
where a loader is built, so this package imports no runtime library.
"""

from agentd.inference.batcher import BatcherStats, DynamicBatcher
from agentd.inference.protocols import ModelLoader, RuntimeExecutor
from agentd.inference.repository import ModelEntry, ModelRepository, ModelState
from agentd.inference.service import InferenceService
from agentd.inference.types import (
    BatchingConfig,
    DataType,
    InferenceRequest,
    InferenceResponse,
    ModelConfig,
    ModelMetadata,
    TensorSpec,
)

__all__ = [
    "BatcherStats",
    "BatchingConfig",
    "DataType",
    "DynamicBatcher",
    "InferenceRequest",
    "InferenceResponse",
    "InferenceService",
    "ModelConfig",
    "ModelEntry",
    "ModelLoader",
    "ModelMetadata",
    "ModelRepository",
    "ModelState",
    "RuntimeExecutor",
    "TensorSpec",
]
