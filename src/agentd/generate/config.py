"""Read a language model folder's ``config.yaml`` (``kind: language-model``).

name: tinylm
kind: language-model
platform: onnxruntime        # or gguf, hf
model: model.onnx            # file (or sub-folder for hf) inside the folder
tokenizer: tokenizer.json
context_length: 1024
eos_token_ids: [1]
kv_cache: {block_size: 16, blocks: 512}   # onnxruntime engine only
max_batch: 64                              # sequences per decode step
lanes: 2                                   # onnxruntime: runs at once (default: one per thread)
prefill_tokens: 256                        # onnxruntime: prompt tokens per prefill run
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agentd.errors import InvalidArgument
from agentd.validation import describe

__all__ = ["LANGUAGE_MODEL_KIND", "LMConfig", "is_language_model", "load_lm_config"]

LANGUAGE_MODEL_KIND = "language-model"
_CONFIG_FILE = "config.yaml"


class _Cache(BaseModel):
    model_config = ConfigDict(extra="forbid")
    block_size: int = Field(16, ge=1, le=1024)
    blocks: int = Field(512, ge=1, le=1_000_000)


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
    kind: str
    platform: str = Field(pattern=r"^(onnxruntime|gguf|hf)$")
    model: str = "model.onnx"
    tokenizer: str = "tokenizer.json"
    context_length: int = Field(ge=2, le=1_048_576)
    eos_token_ids: list[int] = Field(min_length=1)
    kv_cache: _Cache = _Cache()
    max_batch: int = Field(64, ge=1, le=4096)
    lanes: int | None = Field(None, ge=1, le=256)
    prefill_tokens: int = Field(256, ge=1, le=1_048_576)
    description: str = ""
    extra: dict[str, Any] = {}


@dataclass(frozen=True, slots=True)
class LMConfig:
    name: str
    platform: str
    folder: Path
    model_path: Path
    tokenizer_path: Path
    context_length: int
    eos_token_ids: tuple[int, ...]
    block_size: int
    cache_blocks: int
    max_batch: int
    lanes: int | None  # None: one lane per inference thread
    prefill_tokens: int
    description: str
    extra: dict[str, Any]


def _read(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidArgument(f"{path}: cannot read model config: {exc}") from None


def is_language_model(folder: Path) -> bool:
    """True when ``folder`` holds a language model (its config says so)."""
    path = folder / _CONFIG_FILE
    if not path.is_file():
        return False
    try:
        data = _read(path)
    except InvalidArgument:
        return False
    return isinstance(data, dict) and data.get("kind") == LANGUAGE_MODEL_KIND


def load_lm_config(folder: Path) -> LMConfig:
    path = folder / _CONFIG_FILE
    data = _read(path)
    if not isinstance(data, dict):
        raise InvalidArgument(f"{path}: a model config must be a mapping")
    data.setdefault("name", folder.name)
    try:
        parsed = _Config.model_validate(data)
    except ValidationError as exc:
        raise InvalidArgument(f"{path}: invalid model config: {describe(exc)}") from None
    if parsed.kind != LANGUAGE_MODEL_KIND:
        raise InvalidArgument(f"{path}: kind must be {LANGUAGE_MODEL_KIND!r}")
    model_path = (folder / parsed.model).resolve()
    tokenizer_path = (folder / parsed.tokenizer).resolve()
    for what, target in (("model", model_path), ("tokenizer", tokenizer_path)):
        if not target.is_relative_to(folder.resolve()):
            raise InvalidArgument(f"{path}: {what} must be inside the model folder")
        if not target.exists():
            raise InvalidArgument(f"{path}: {what} file {target.name!r} is missing")
    return LMConfig(
        name=parsed.name,
        platform=parsed.platform,
        folder=folder,
        model_path=model_path,
        tokenizer_path=tokenizer_path,
        context_length=parsed.context_length,
        eos_token_ids=tuple(parsed.eos_token_ids),
        block_size=parsed.kv_cache.block_size,
        cache_blocks=parsed.kv_cache.blocks,
        max_batch=parsed.max_batch,
        lanes=parsed.lanes,
        prefill_tokens=parsed.prefill_tokens,
        description=parsed.description,
        extra=parsed.extra,
    )
