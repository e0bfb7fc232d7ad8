"""Tensor and model descriptions shared by loaders, executors, the batcher and the protocols.

Plain Python and numpy only: no runtime library is imported here.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "BatchingConfig",
    "DataType",
    "InferenceRequest",
    "InferenceResponse",
    "ModelConfig",
    "ModelMetadata",
    "TensorSpec",
]


class DataType(enum.Enum):
    """Tensor element types, named as in the KServe v2 protocol."""

    BOOL = "BOOL"
    UINT8 = "UINT8"
    UINT16 = "UINT16"
    UINT32 = "UINT32"
    UINT64 = "UINT64"
    INT8 = "INT8"
    INT16 = "INT16"
    INT32 = "INT32"
    INT64 = "INT64"
    FP16 = "FP16"
    FP32 = "FP32"
    FP64 = "FP64"
    BYTES = "BYTES"

    @property
    def numpy(self) -> np.dtype:
        return _TO_NUMPY[self]

    @property
    def itemsize(self) -> int:
        """Bytes per element; 0 for BYTES (variable length)."""
        return 0 if self is DataType.BYTES else _TO_NUMPY[self].itemsize

    @classmethod
    def from_numpy(cls, dtype: np.dtype) -> DataType:
        dtype = np.dtype(dtype)
        if dtype.kind in ("O", "S", "U"):
            return cls.BYTES
        try:
            return _FROM_NUMPY[dtype]
        except KeyError:
            raise ValueError(f"no KServe datatype for numpy dtype {dtype}") from None

    @classmethod
    def parse(cls, name: str) -> DataType:
        try:
            return cls(name)
        except ValueError:
            raise ValueError(
                f"unknown datatype {name!r}; expected one of {', '.join(d.value for d in cls)}"
            ) from None


_TO_NUMPY: dict[DataType, np.dtype] = {
    DataType.BOOL: np.dtype(np.bool_),
    DataType.UINT8: np.dtype(np.uint8),
    DataType.UINT16: np.dtype(np.uint16),
    DataType.UINT32: np.dtype(np.uint32),
    DataType.UINT64: np.dtype(np.uint64),
    DataType.INT8: np.dtype(np.int8),
    DataType.INT16: np.dtype(np.int16),
    DataType.INT32: np.dtype(np.int32),
    DataType.INT64: np.dtype(np.int64),
    DataType.FP16: np.dtype(np.float16),
    DataType.FP32: np.dtype(np.float32),
    DataType.FP64: np.dtype(np.float64),
    DataType.BYTES: np.dtype(object),
}
_FROM_NUMPY = {dtype: name for name, dtype in _TO_NUMPY.items() if name is not DataType.BYTES}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A named tensor: element type and shape, ``-1`` for a dimension of any size."""

    name: str
    datatype: DataType
    shape: tuple[int, ...]

    def accepts_shape(self, shape: tuple[int, ...]) -> bool:
        if len(shape) != len(self.shape):
            return False
        return all(want in (-1, got) for want, got in zip(self.shape, shape, strict=True))


@dataclass(frozen=True, slots=True)
class BatchingConfig:
    """Dynamic batching: stack calls arriving within ``max_queue_delay_us`` into one run."""

    max_batch_size: int = 0  # 0: the model takes no batch dimension; no batching
    max_queue_delay_us: int = 500
    max_queue_size: int = 1024  # waiting requests; more get RESOURCE_EXHAUSTED
    # Calls of different lengths on axis 1 (an encoder's sequences) are zero-padded to
    # the batch's longest, and each caller's outputs cut back to its length.
    pad_ragged: bool = False


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """What ``config.yaml`` beside a model file says (all optional but the name)."""

    name: str
    version: str = "1"
    platform: str = "onnxruntime"
    inputs: tuple[TensorSpec, ...] | None = None  # None: read from the model file
    outputs: tuple[TensorSpec, ...] | None = None
    batching: BatchingConfig = BatchingConfig()
    labels: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. recorded accuracy
    kind: str = "tensor"  # or "embedding" (also served by /v1/embeddings, ctx.embed)
    # kind embedding: its agentd.inference.embedding.EmbeddingConfig
    embedding: Any = None


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    """A loaded model as clients see it. Shapes include the batch dimension (``-1``) when
    ``max_batch_size > 0``."""

    name: str
    version: str
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    execution_providers: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    output_names: frozenset[str] = field(init=False, repr=False, compare=False)
    # (name, numpy dtype, shape, fixed) per input: "fixed" when no dimension past the batch
    # dimension is -1. Prepared once; checked on every call.
    input_checks: tuple[tuple[str, np.dtype, tuple[int, ...], bool], ...] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "output_names", frozenset(s.name for s in self.outputs))
        skip = 1 if self.max_batch_size > 0 else 0
        checks = tuple(
            (s.name, s.datatype.numpy, s.shape, -1 not in s.shape[skip:]) for s in self.inputs
        )
        object.__setattr__(self, "input_checks", checks)

    def input(self, name: str) -> TensorSpec | None:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        return None

    def output(self, name: str) -> TensorSpec | None:
        for spec in self.outputs:
            if spec.name == name:
                return spec
        return None


@dataclass(frozen=True, slots=True)
class InferenceRequest:
    """One inference call as a protocol adapter hands it to the service.

    ``timeout`` is the request's own timeout and ``call_timeout`` the transport's deadline
    for the call (e.g. grpc-timeout), both in seconds, None when not given: the service
    takes the tighter and applies the node's deadline rule to it.
    """

    model: str
    inputs: Mapping[str, np.ndarray]
    version: str | None = None
    outputs: Sequence[str] | None = None  # None: every output of the model
    timeout: float | None = None
    call_timeout: float | None = None


@dataclass(frozen=True, slots=True)
class InferenceResponse:
    """The outputs of one call and the model version that computed them."""

    model: str
    version: str
    outputs: dict[str, np.ndarray]
