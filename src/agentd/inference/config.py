"""Read a model's ``config.yaml`` into a :class:`ModelConfig`, with errors that name the field."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agentd.errors import InvalidArgument
from agentd.inference.embedding import EMBEDDING_KIND, parse_embedding_config
from agentd.inference.types import BatchingConfig, DataType, ModelConfig, TensorSpec
from agentd.models.catalog import CONFIG_FILE, read_document
from agentd.validation import describe

__all__ = ["CONFIG_FILE", "load_model_config", "parse_model_config"]


class _Tensor(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    datatype: str
    shape: list[int]

    @field_validator("datatype")
    @classmethod
    def _known(cls, value: str) -> str:
        DataType.parse(value)
        return value

    @field_validator("shape")
    @classmethod
    def _dims(cls, value: list[int]) -> list[int]:
        if any(d < -1 or d == 0 for d in value):
            raise ValueError("dimensions must be positive, or -1 for any size")
        return value


class _Batching(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_queue_delay_us: int = Field(500, ge=0, le=10_000_000)
    max_queue_size: int = Field(1024, gt=0)


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
    version: str = "1"
    platform: str = "onnxruntime"
    max_batch_size: int = Field(0, ge=0)
    dynamic_batching: _Batching | None = None
    inputs: list[_Tensor] | None = None
    outputs: list[_Tensor] | None = None
    labels: list[str] = []
    extra: dict[str, Any] = {}
    # embedding: an encoder also served by /v1/embeddings (agentd.inference.embedding)
    kind: Literal["tensor", "embedding"] = "tensor"
    embedding: dict[str, Any] | None = None

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) else value


def _tensors(items: list[_Tensor] | None) -> tuple[TensorSpec, ...] | None:
    if items is None:
        return None
    return tuple(TensorSpec(t.name, DataType(t.datatype), tuple(t.shape)) for t in items)


def load_model_config(path: Path, default_name: str) -> ModelConfig:
    """Parse ``path`` (may be absent: defaults with ``default_name``). Raises InvalidArgument."""
    return parse_model_config(read_document(path), path, default_name)


def parse_model_config(
    document: dict[str, Any] | None, path: Path, default_name: str
) -> ModelConfig:
    """A tensor model's config from its parsed ``config.yaml`` at ``path`` (None: absent, the
    defaults with ``default_name``). Raises InvalidArgument naming the file and the field."""
    data = dict(document or {})
    data.setdefault("name", default_name)
    try:
        parsed = _Config.model_validate(data)
    except ValidationError as exc:
        raise InvalidArgument(f"{path}: invalid model config: {describe(exc)}") from None
    batching = BatchingConfig(max_batch_size=parsed.max_batch_size)
    if parsed.dynamic_batching is not None:
        batching = BatchingConfig(
            max_batch_size=parsed.max_batch_size,
            max_queue_delay_us=parsed.dynamic_batching.max_queue_delay_us,
            max_queue_size=parsed.dynamic_batching.max_queue_size,
        )
    embedding = None
    if parsed.kind == EMBEDDING_KIND:
        embedding = parse_embedding_config(parsed.embedding, path)
        # The callers' sequences differ in length: padded to the batch's longest.
        batching = dataclasses.replace(batching, pad_ragged=True)
    elif parsed.embedding is not None:
        raise InvalidArgument(f"{path}: an 'embedding' section needs kind: embedding")
    return ModelConfig(
        name=parsed.name,
        version=parsed.version,
        platform=parsed.platform,
        inputs=_tensors(parsed.inputs),
        outputs=_tensors(parsed.outputs),
        batching=batching,
        labels=tuple(parsed.labels),
        extra=parsed.extra,
        kind=parsed.kind,
        embedding=embedding,
    )
