"""Embedding models: an ONNX encoder (BERT/MiniLM shape) plus its ``tokenizer.json``, in a
model folder whose ``config.yaml`` says ``kind: embedding``.

The encoder is an ordinary tensor model of the repository (KServe serves its raw inputs and
outputs), batched across callers by the micro-batcher with each call's sequences
zero-padded to the batch's longest (``BatchingConfig.pad_ragged``). :class:`Embeddings`
adds what ``/v1/embeddings`` and ``ctx.embed`` need: tokenizing, then pooling (mean over
the attention mask, or the first token) and optional L2 normalisation in numpy.

A text longer than ``max_tokens`` is refused (InvalidArgument) unless the config says
``truncate: true``, which cuts it to ``max_tokens`` tokens (special tokens included).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agentd.errors import InvalidArgument, NotFound, Unavailable
from agentd.validation import describe

if TYPE_CHECKING:
    from agentd.inference.service import InferenceService

__all__ = [
    "EMBEDDING_KIND",
    "Embedded",
    "EmbeddingConfig",
    "EmbeddingModel",
    "Embeddings",
    "parse_embedding_config",
    "pool",
]

EMBEDDING_KIND = "embedding"
TOKENIZER_FILE = "tokenizer.json"
# One call's texts at most (as OpenAI's /v1/embeddings).
MAX_INPUTS = 2048


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pooling: Literal["mean", "cls"] = "mean"
    normalize: bool = True
    max_tokens: int = Field(512, gt=0, le=1 << 16)
    truncate: bool = False
    dimensions: int | None = Field(None, gt=0)
    output: str = "last_hidden_state"


@dataclass(frozen=True, slots=True)
class EmbeddingConfig:
    """The ``embedding:`` section of an embedding model's ``config.yaml``."""

    pooling: str = "mean"  # mean (over the attention mask) or cls (the first token)
    normalize: bool = True  # L2-normalise each vector
    max_tokens: int = 512  # longest text, special tokens included
    truncate: bool = False  # False: a longer text is refused; True: cut to max_tokens
    dimensions: int | None = None  # the vector size (None: the encoder's hidden size)
    output: str = "last_hidden_state"  # the encoder output pooled


def parse_embedding_config(section: Any, path: Path) -> EmbeddingConfig:
    """The ``embedding:`` section (None: defaults). Raises InvalidArgument naming the
    file and the field."""
    try:
        parsed = _Section.model_validate(section or {})
    except ValidationError as exc:
        raise InvalidArgument(f"{path}: invalid embedding config: {describe(exc)}") from None
    return EmbeddingConfig(**parsed.model_dump())


def pool(hidden: np.ndarray, mask: np.ndarray, pooling: str, normalize: bool) -> np.ndarray:
    """Sentence vectors from an encoder's ``hidden`` states ``[rows, tokens, width]``:
    the mean over ``mask`` (as sentence-transformers computes it) or the first token;
    L2-normalised when ``normalize``. float32 ``[rows, width]``."""
    hidden = hidden.astype(np.float32, copy=False)
    if pooling == "cls":
        vectors = hidden[:, 0].copy()
    else:
        weights = mask.astype(np.float32)[:, :, None]
        vectors = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)
    return vectors.astype(np.float32, copy=False)


@dataclass(frozen=True, slots=True)
class Embedded:
    """The vectors of one call (``[inputs, dimensions]`` float32) and the tokens read."""

    vectors: np.ndarray
    prompt_tokens: int


class EmbeddingModel:
    """One loaded embedding model: its tokenizer and config, over the inference service."""

    def __init__(self, name: str, source: Path, config: EmbeddingConfig, metadata: Any) -> None:
        from tokenizers import Tokenizer

        self.name = name
        self.config = config
        self.metadata = metadata
        path = source / TOKENIZER_FILE
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the library raises plain Exception on a bad file
            raise InvalidArgument(f"cannot read tokenizer {path}: {exc}") from None
        tokenizer.no_padding()
        if config.truncate:
            tokenizer.enable_truncation(config.max_tokens)
        else:
            tokenizer.no_truncation()
        self._tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        names = {spec.name for spec in metadata.inputs}
        if "input_ids" not in names:
            raise InvalidArgument(f"embedding model {name!r} has no input 'input_ids'")
        self._dtypes = {spec.name: spec.datatype.numpy for spec in metadata.inputs}
        output = metadata.output(config.output)
        if output is None:
            raise InvalidArgument(
                f"embedding model {name!r} has no output {config.output!r} (its outputs: "
                f"{sorted(s.name for s in metadata.outputs)})"
            )
        width = output.shape[-1]
        self.dimensions = config.dimensions or (width if width > 0 else 0)
        if config.dimensions and width > 0 and width != config.dimensions:
            raise InvalidArgument(
                f"embedding model {name!r}: dimensions {config.dimensions} differs from "
                f"its output {config.output!r} width {width}"
            )
        self.max_rows = max(metadata.max_batch_size, 1)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text, special tokens added; InvalidArgument for a text over
        ``max_tokens`` (unless the model truncates)."""
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=True)
        ids = [e.ids for e in encodings]
        self.check_lengths(ids)
        return ids

    def check_lengths(self, ids: Sequence[Sequence[int]]) -> None:
        for index, row in enumerate(ids):
            if not row:
                raise InvalidArgument(f"input {index} is empty")
            if len(row) > self.config.max_tokens:
                raise InvalidArgument(
                    f"input {index} is {len(row)} tokens; model {self.name!r} takes at most "
                    f"{self.config.max_tokens}"
                )

    def check_ids(self, ids: Sequence[Sequence[int]]) -> None:
        """Token ids given by a caller: each in the vocabulary, each row within bounds."""
        self.check_lengths(ids)
        for index, row in enumerate(ids):
            for token in row:
                if not 0 <= token < self.vocab_size:
                    raise InvalidArgument(
                        f"input {index} has token id {token}; the vocabulary has "
                        f"{self.vocab_size} tokens"
                    )

    def inputs(self, ids: Sequence[Sequence[int]]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The encoder's inputs for ``ids`` (padded to the longest) and the attention mask."""
        longest = max(len(row) for row in ids)
        input_ids = np.zeros((len(ids), longest), dtype=np.int64)
        mask = np.zeros((len(ids), longest), dtype=np.int64)
        for index, row in enumerate(ids):
            input_ids[index, : len(row)] = row
            mask[index, : len(row)] = 1
        arrays = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in self._dtypes:
            arrays["token_type_ids"] = np.zeros_like(input_ids)
        inputs = {
            name: arrays[name].astype(dtype, copy=False)
            for name, dtype in self._dtypes.items()
            if name in arrays
        }
        return inputs, mask


class Embeddings:
    """The embedding models of an inference service: tokenize, run batched, pool."""

    def __init__(self, inference: InferenceService) -> None:
        self._inference = inference
        self._lock = threading.Lock()
        # name -> (the executor it was made for, the model): a reload makes a new one.
        self._models: dict[str, tuple[object, EmbeddingModel]] = {}

    def names(self) -> list[str]:
        """The embedding models loaded now."""
        return [
            entry.name
            for entry in self._inference.entries()
            if entry.executor is not None  # an unloaded one is not listed
            and entry.config is not None
            and entry.config.kind == EMBEDDING_KIND
        ]

    def get(self, name: str) -> EmbeddingModel:
        """The embedding model ``name``: NotFound when there is no such embedding model,
        Unavailable when it is not loaded."""
        try:
            entry = self._inference.entry(name)
        except NotFound:
            raise NotFound(f"no embedding model {name!r}") from None
        config, executor = entry.config, entry.executor
        # Never loaded (kind unknown yet) or an unloaded embedding model.
        if executor is None and (config is None or config.kind == EMBEDDING_KIND):
            raise Unavailable(f"model {name!r} is not loaded")
        if config is None or config.kind != EMBEDDING_KIND or executor is None:
            raise NotFound(f"model {name!r} is not an embedding model")
        with self._lock:
            cached = self._models.get(name)
            if cached is not None and cached[0] is executor:
                return cached[1]
        model = EmbeddingModel(name, entry.source, config.embedding, executor.metadata)
        with self._lock:
            self._models[name] = (executor, model)
        return model

    async def embed(
        self,
        name: str,
        texts: Sequence[str] | Sequence[Sequence[int]],
        *,
        timeout: float | None = None,
    ) -> Embedded:
        """Vectors for ``texts`` (strings, or lists of token ids taken as the encoder's
        input as they are). Rows go through the micro-batcher with other callers', at
        most the model's batch size per call. Raises NotFound, InvalidArgument, and what
        inference raises."""
        model = self.get(name)
        if not texts:
            raise InvalidArgument("no inputs to embed")
        if len(texts) > MAX_INPUTS:
            raise InvalidArgument(f"{len(texts)} inputs; at most {MAX_INPUTS} per call")
        if all(isinstance(t, str) for t in texts):
            ids = model.tokenize(texts)  # type: ignore[arg-type]
        else:
            ids = [list(row) for row in texts]  # type: ignore[arg-type]
            model.check_ids(ids)
        step = model.max_rows
        chunks = [ids[i : i + step] for i in range(0, len(ids), step)]
        parts = await asyncio.gather(*(self._run(model, chunk, timeout) for chunk in chunks))
        vectors = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return Embedded(vectors, sum(len(row) for row in ids))

    async def _run(
        self, model: EmbeddingModel, ids: list[list[int]], timeout: float | None
    ) -> np.ndarray:
        inputs, mask = model.inputs(ids)
        out = await self._inference.infer(
            model.name, inputs, outputs=[model.config.output], timeout=timeout
        )
        hidden = out[model.config.output]
        return pool(hidden, mask, model.config.pooling, model.config.normalize)
