"""Read a language model folder's ``config.yaml`` (``kind: language-model``).

name: tinylm
kind: language-model
platform: onnxruntime        # or gguf, hf
model: model.onnx            # file (or sub-folder for hf) inside the folder
tokenizer: tokenizer.json
context_length: 1024
eos_token_ids: [1]
kv_cache: {block_size: 16, blocks: 512}   # onnxruntime engine only; prefix_cache: false
                                           # turns off reuse of cached prompt blocks
max_batch: 64                              # sequences per decode step
lanes: 2                                   # onnxruntime: runs at once (default: one per thread)
prefill_tokens: 256                        # prompt tokens per prefill run (onnxruntime, gguf)
batched: true                              # gguf: false runs one sequence at a time
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agentd.errors import InvalidArgument
from agentd.models.catalog import CONFIG_FILE, LANGUAGE_MODEL_KIND, read_document
from agentd.validation import describe

__all__ = ["LANGUAGE_MODEL_KIND", "LMConfig", "load_lm_config", "parse_lm_config"]


class _Cache(BaseModel):
    model_config = ConfigDict(extra="forbid")
    block_size: int = Field(16, ge=1, le=1024)
    blocks: int = Field(512, ge=1, le=1_000_000)
    prefix_cache: bool = Field(True, strict=True)


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
    batched: bool = Field(True, strict=True)
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
    batched: bool = True  # gguf: llama.cpp multi-sequence batches; False: one at a time
    prefix_cache: bool = True  # reuse cached blocks of prompt prefixes (onnxruntime)


def load_lm_config(folder: Path) -> LMConfig:
    """Read and check ``folder``'s config.yaml. Raises InvalidArgument naming the file."""
    path = folder / CONFIG_FILE
    document = read_document(path)
    if document is None:
        raise InvalidArgument(f"{path}: cannot read model config: no such file")
    return parse_lm_config(document, folder)


def parse_lm_config(document: dict[str, Any], folder: Path) -> LMConfig:
    """A language model's config from its folder's parsed ``config.yaml``; checks that the
    model and tokenizer files it names are inside the folder. Raises InvalidArgument."""
    path = folder / CONFIG_FILE
    data = dict(document)
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
        batched=parsed.batched,
        prefix_cache=parsed.kv_cache.prefix_cache,
    )
