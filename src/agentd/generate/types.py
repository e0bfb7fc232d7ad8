"""What every token-generating backend shares: request parameters and the backend protocols.

Plain Python only. Backends yield token ids; turning ids into text deltas, stop sequences and
finish reasons happens once, above them (``text_stream.py``).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from agentd.errors import InvalidArgument

__all__ = [
    "MAX_LOGIT_BIAS",
    "MAX_PENALTY",
    "MAX_SEED",
    "MAX_TOP_LOGPROBS",
    "LMInfo",
    "SamplingParams",
    "ScoredToken",
    "SequenceBackend",
    "TextGenerator",
]

MAX_SEED = 2**64 - 1  # numpy's generators take seeds in [0, 2**64)
MAX_PENALTY = 2.0  # presence/frequency penalties are in [-2, 2], as in the OpenAI API
MAX_LOGIT_BIAS = 100.0  # logit_bias values are in [-100, 100]
MAX_TOP_LOGPROBS = 20


class ScoredToken(int):
    """A token id (it is the int) with its log-probability and the most likely
    alternatives, ``top``: ``(token id, logprob)`` pairs, most likely first. Samplers
    return one only when logprobs were asked for; every layer that takes ids takes it.
    Log-probabilities are a log-softmax of the model's raw logits (before temperature,
    penalties and logit_bias), so they say what the model predicted."""

    logprob: float
    top: tuple[tuple[int, float], ...]

    def __new__(cls, token: int, logprob: float, top: tuple[tuple[int, float], ...] = ()):
        self = super().__new__(cls, token)
        self.logprob = logprob
        self.top = top
        return self


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick each next token. Validated by the API layer before it gets here."""

    max_tokens: int = 64
    # 0 means greedy (argmax); top_k 0 means no top-k cut; top_p 1.0 means no nucleus cut.
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    # Text-level stop sequences; handled in text_stream, not by backends.
    stop: tuple[str, ...] = ()
    # OpenAI's penalties on the tokens generated so far: a logit drops by
    # count * frequency_penalty + (count > 0) * presence_penalty.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # (token id, bias) pairs added to the logits before each pick.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Report each token's logprob, and its top_logprobs most likely alternatives.
    logprobs: bool = False
    top_logprobs: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def shapes_logits(self) -> bool:
        """Whether anything changes the logits before the pick (penalties, bias)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)

    def validate(self) -> None:
        """InvalidArgument naming the first field out of range (for callers inside the
        process; the OpenAI layer checks each field itself to name its ``param``)."""
        if self.max_tokens < 1:
            raise InvalidArgument(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidArgument(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidArgument(f"top_k must be at least 0, got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise InvalidArgument(f"seed must be in [0, 2**64), got {self.seed}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise InvalidArgument(f"{name} must be in [-2, 2], got {value}")
        for token, bias in self.logit_bias:
            if token < 0:
                raise InvalidArgument(f"logit_bias token ids must be at least 0, got {token}")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise InvalidArgument(f"logit_bias values must be in [-100, 100], got {bias}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidArgument(f"top_logprobs must be in [0, 20], got {self.top_logprobs}")

    def check_vocab(self, vocab_size: int) -> None:
        """InvalidArgument when a logit_bias token id is outside the model's vocabulary."""
        bad = next((t for t, _ in self.logit_bias if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise InvalidArgument(
                f"logit_bias token id {bad} is outside the vocabulary (0..{vocab_size - 1})"
            )


@dataclass(frozen=True, slots=True)
class LMInfo:
    """What the API layer needs to know about a loaded language model."""

    name: str
    platform: str  # "onnxruntime", "gguf", "hf"
    context_length: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]


@runtime_checkable
class TextGenerator(Protocol):
    """A loaded language model that streams token ids for a prompt."""

    @property
    def info(self) -> LMInfo: ...

    def stream(
        self, prompt_ids: Sequence[int], params: SamplingParams
    ) -> AsyncGenerator[int, None]:
        """Yield generated token ids (eos excluded) until eos or ``params.max_tokens``.

        Closing the iterator early (``aclose()``, or the consuming task being cancelled)
        stops generation and frees what the sequence held at once.
        """
        ...

    async def close(self) -> None: ...


class SequenceBackend(Protocol):
    """One sequence at a time, blocking: the shape of the GGUF and HF backends.

    ``serial.SerialGenerator`` drives one on a thread (sampling, max_tokens, eos,
    cancellation) and so turns it into a :class:`TextGenerator`.
    """

    info: LMInfo

    def prefill(self, prompt_ids: Sequence[int]) -> np.ndarray:
        """Reset, run the prompt, return the next-token logits (float32, shape [vocab])."""
        ...

    def decode(self, token_id: int) -> np.ndarray:
        """Append one token, return the next-token logits."""
        ...

    def close(self) -> None: ...
