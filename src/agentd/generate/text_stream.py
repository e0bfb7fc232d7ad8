"""Token ids to text deltas: incremental detokenizing, stop sequences, finish reasons."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Sequence
from typing import TYPE_CHECKING

from agentd.errors import DeadlineExceeded
from agentd.generate.tokenizer import Detokenizer, Tokenizer
from agentd.generate.types import SamplingParams, ScoredToken, TextGenerator

if TYPE_CHECKING:
    from agentd.observability.spans import Spans

__all__ = ["TextStream"]


def _stop_at(text: str, stops: Sequence[str]) -> int | None:
    """Index of the earliest stop sequence in ``text``, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that could begin a stop sequence."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class TextStream:
    """Iterate for text deltas; afterwards ``finish_reason`` and ``completion_tokens`` are
    set. Leaving the loop early stops generation and frees the sequence's cache.

    ``deadline`` (the event loop's clock, or None): waiting for a token past it stops the
    generation (its cache freed) and raises DeadlineExceeded."""

    def __init__(
        self,
        generator: TextGenerator,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        deadline: float | None = None,
        spans: Spans | None = None,
    ) -> None:
        self._spans = spans
        # Time to first token counts from here (the request reached the generator).
        self._created = time.perf_counter() if spans is not None else 0.0
        self._generator = generator
        self._tokenizer = tokenizer
        self._params = params
        self._deadline = deadline
        self.prompt_ids = list(prompt_ids)
        # Checks the request now (empty or too long prompt) rather than at first iteration.
        self._tokens = generator.stream(self.prompt_ids, params)
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        # With params.logprobs: every generated token, with its logprob and alternatives.
        self.scored: list[ScoredToken] | None = [] if params.logprobs else None
        self._taken = 0

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def take_scored(self) -> list[ScoredToken]:
        """The scored tokens since the last call (for the piece a stream sends now)."""
        scored = self.scored
        if scored is None:
            return []
        taken, self._taken = self._taken, len(scored)
        return scored[taken:]

    def __aiter__(self) -> AsyncGenerator[str, None]:
        if self._spans is None:
            return self._pieces()
        return self._traced(self._spans)

    async def _traced(self, spans: Spans) -> AsyncGenerator[str, None]:
        """``_pieces`` in a ``generate`` span (a child of the span current where iteration
        starts): time to first token, tokens and finish reason; no span per token."""
        span = spans.generate(
            self._generator.info.name, self.prompt_tokens, self._params.max_tokens
        )
        started = self._created
        first_token_s = None
        error: BaseException | None = None
        pieces = self._pieces()
        try:
            async for piece in pieces:
                if first_token_s is None:
                    first_token_s = time.perf_counter() - started
                yield piece
        except BaseException as exc:
            error = exc
            raise
        finally:
            await pieces.aclose()
            spans.generated(
                span,
                first_token_s=first_token_s,
                completion_tokens=self.completion_tokens,
                finish_reason=self.finish_reason,
                error=error if not isinstance(error, GeneratorExit) else None,
            )

    async def _pieces(self) -> AsyncGenerator[str, None]:
        stops = [s for s in self._params.stop if s]
        detokenizer = Detokenizer(self._tokenizer)
        pending = ""
        scored = self.scored
        try:
            while (token := await self._next_token()) is not None:
                self.completion_tokens += 1
                if scored is not None and isinstance(token, ScoredToken):
                    scored.append(token)
                pending += detokenizer.push(token)
                if not pending:
                    continue
                if stops:
                    cut = _stop_at(pending, stops)
                    if cut is not None:
                        if cut:
                            yield pending[:cut]
                        self.finish_reason = "stop"
                        return
                    keep = _held_back(pending, stops)
                    ready, pending = pending[: len(pending) - keep], pending[len(pending) - keep :]
                else:
                    ready, pending = pending, ""
                if ready:
                    yield ready
            pending += detokenizer.flush()
            cut = _stop_at(pending, stops) if stops else None
            if cut is not None:
                pending = pending[:cut]
                self.finish_reason = "stop"
            elif self.completion_tokens >= self._params.max_tokens:
                self.finish_reason = "length"
            else:
                self.finish_reason = "stop"
            if pending:
                yield pending
        finally:
            await self._tokens.aclose()

    async def _next_token(self) -> int | None:
        """The generator's next token (None at its end), awaited within the deadline."""
        deadline = self._deadline
        try:
            if deadline is None:
                return await anext(self._tokens)
            scope = asyncio.timeout_at(deadline)
            try:
                async with scope:
                    return await anext(self._tokens)
            except TimeoutError:
                if not scope.expired():
                    raise
                raise DeadlineExceeded(
                    f"model {self._generator.info.name!r} did not finish before the deadline "
                    f"({self.completion_tokens} tokens generated)"
                ) from None
        except StopAsyncIteration:
            return None

    async def text(self) -> str:
        """The whole completion as one string."""
        return "".join([piece async for piece in self])

    async def aclose(self) -> None:
        """Stop a completion that may never be iterated (frees what it holds)."""
        await self._tokens.aclose()
