"""``POST /v1/embeddings`` in OpenAI's shape, over the inference service's embedding models.

``input`` is a string, a list of strings, a list of token ids or a list of lists of token
ids; ``encoding_format`` is ``float`` (default) or ``base64`` (the vectors' little-endian
float32 bytes, as OpenAI sends them: the openai package asks for base64 by default);
``dimensions`` is accepted only when it equals the model's (agentd does not shorten
vectors). Every problem is a :class:`RequestError` naming the field (a 400).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from agentd.errors import InvalidArgument, NotFound
from agentd.gateway.openai.requests import RequestError
from agentd.inference.embedding import MAX_INPUTS

if TYPE_CHECKING:
    from agentd.inference.embedding import Embeddings

__all__ = ["EMBEDDINGS_PATH", "EmbeddingRequest", "EmbeddingRoutes", "parse_embedding"]

EMBEDDINGS_PATH = "/v1/embeddings"
_FORMATS = ("float", "base64")


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    model: str
    inputs: list[str] | list[list[int]]
    encoding_format: str
    dimensions: int | None


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    )


def parse_embedding(data: Any) -> EmbeddingRequest:
    """Validate a /v1/embeddings body; RequestError names the offending field."""
    if not isinstance(data, dict):
        raise RequestError("the body must be a JSON object", None)
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("'model' must be a non-empty string", "model")
    raw = data.get("input")
    inputs: list[str] | list[list[int]]
    if isinstance(raw, str):
        inputs = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(t, str) for t in raw):
        inputs = list(raw)
    elif isinstance(raw, list) and raw and _token_ids(raw):
        inputs = [list(raw)]
    elif isinstance(raw, list) and raw and all(_token_ids(row) for row in raw):
        inputs = [list(row) for row in raw]
    else:
        raise RequestError(
            "'input' must be a string, a non-empty list of strings, a list of token ids "
            "or a list of lists of token ids",
            "input",
        )
    if len(inputs) > MAX_INPUTS:
        raise RequestError(f"'input' has {len(inputs)} items; at most {MAX_INPUTS}", "input")
    for index, item in enumerate(inputs):
        if len(item) == 0:
            raise RequestError(f"'input' item {index} is empty", "input")
    encoding = data.get("encoding_format", "float")
    if encoding is None:
        encoding = "float"
    if encoding not in _FORMATS:
        raise RequestError("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    dimensions = data.get("dimensions")
    if dimensions is not None and (
        not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1
    ):
        raise RequestError("'dimensions' must be a positive integer", "dimensions")
    user = data.get("user")
    if user is not None and not isinstance(user, str):
        raise RequestError("'user' must be a string", "user")
    return EmbeddingRequest(model, inputs, encoding, dimensions)


class EmbeddingRoutes:
    """The /v1/embeddings handler and the embedding models' /v1/models cards."""

    def __init__(self, embeddings: Embeddings | None) -> None:
        self._embeddings = embeddings

    def names(self) -> list[str]:
        return self._embeddings.names() if self._embeddings is not None else []

    def cards(self, created: int) -> list[dict[str, Any]]:
        """The /v1/models cards of the embedding models loaded now."""
        cards = (self.card(name, created) for name in self.names())
        return [card for card in cards if card is not None]

    def card(self, name: str, created: int) -> dict[str, Any] | None:
        """The /v1/models card of embedding model ``name``; None when it is not one."""
        if self._embeddings is None or name not in self.names():
            return None
        model = self._embeddings.get(name)
        return {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "agentd",
            "kind": "embedding",
            "dimensions": model.dimensions,
            "max_tokens": model.config.max_tokens,
        }

    async def embed(self, data: Any) -> dict[str, Any]:
        """The response body for a /v1/embeddings request body ``data``."""
        request = parse_embedding(data)
        if self._embeddings is None:
            raise NotFound(f"no embedding model {request.model!r}")
        model = self._embeddings.get(request.model)  # NotFound: model_not_found
        if request.dimensions is not None and request.dimensions != model.dimensions:
            raise RequestError(
                f"'dimensions' is {request.dimensions}; model {model.name!r} gives "
                f"{model.dimensions} (vectors are not shortened)",
                "dimensions",
            )
        try:
            # The OpenAI API carries no deadline of the caller's: the default applies.
            result = await self._embeddings.embed(model.name, request.inputs)
        except InvalidArgument as exc:
            if isinstance(exc, RequestError):
                raise
            raise RequestError(exc.message, "input") from None
        data_out = [
            {"object": "embedding", "index": index, "embedding": _encode(row, request)}
            for index, row in enumerate(result.vectors)
        ]
        return {
            "object": "list",
            "data": data_out,
            "model": model.name,
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
        }


def _encode(row: np.ndarray, request: EmbeddingRequest) -> list[float] | str:
    if request.encoding_format == "base64":
        return base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
    return row.tolist()
