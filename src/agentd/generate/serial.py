"""Turn a blocking one-sequence backend (GGUF, HF) into an async token stream.

A :class:`SerialGenerator` owns one worker thread. Each ``stream()`` call submits a job to
it; jobs run one after another in arrival order, so concurrent streams wait their turn. The
job prefills the prompt, samples each next token with :class:`~agentd.generate.sampling.
Sampler`, and hands every token to the consumer's event loop with ``call_soon_threadsafe``.
When the consumer stops (``aclose()``, cancellation, or simply dropping the iterator) a
stop flag ends the job before its next decode step; a job whose stream was abandoned while
it still waited in line never starts.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from agentd.errors import FailedPrecondition, InvalidArgument
from agentd.generate.sampling import Sampler
from agentd.generate.types import LMInfo, SamplingParams, SequenceBackend

__all__ = ["SerialGenerator", "checked_prompt"]


def checked_prompt(info: LMInfo, prompt_ids: Sequence[int]) -> list[int]:
    """``prompt_ids`` as a list of ints; InvalidArgument when empty, too long for the
    model's context (one position is left for the first new token) or holding an id
    outside the vocabulary (llama.cpp aborts the process on one: checked first)."""
    prompt = [int(token) for token in prompt_ids]
    if not prompt:
        raise InvalidArgument("the prompt is empty: it must hold at least one token")
    if len(prompt) >= info.context_length:
        raise InvalidArgument(
            f"the prompt is {len(prompt)} tokens; model {info.name!r} takes at most "
            f"{info.context_length - 1} (its context is {info.context_length} tokens)"
        )
    bad = next((t for t in prompt if not 0 <= t < info.vocab_size), None)
    if bad is not None:
        raise InvalidArgument(
            f"token id {bad} is outside the vocabulary (0..{info.vocab_size - 1})"
        )
    return prompt


_DONE = object()  # end-of-stream marker passed through the hand-off queue


class SerialGenerator:
    """:class:`~agentd.generate.types.TextGenerator` over a :class:`SequenceBackend`."""

    def __init__(self, backend: SequenceBackend) -> None:
        self._backend = backend
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"agentd-lm-{backend.info.name}"
        )
        self._closed = False
        self._eos = frozenset(backend.info.eos_token_ids)

    @property
    def info(self) -> LMInfo:
        return self._backend.info

    async def stream(
        self, prompt_ids: Sequence[int], params: SamplingParams
    ) -> AsyncGenerator[int, None]:
        """Yield generated token ids (eos excluded) until eos, ``params.max_tokens`` or the
        end of the context window."""
        if self._closed:
            raise FailedPrecondition(f"model {self.info.name!r} is closed")
        prompt = checked_prompt(self.info, prompt_ids)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        stop = threading.Event()

        def emit(item: object) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the consumer's loop is gone: nobody is listening
                stop.set()

        self._executor.submit(self._run, prompt, params, stop, emit)
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]
        finally:
            stop.set()

    def _run(
        self,
        prompt: list[int],
        params: SamplingParams,
        stop: threading.Event,
        emit: Callable[[object], None],
    ) -> None:
        """The worker thread's job for one sequence."""
        try:
            if stop.is_set():
                return
            limit = min(params.max_tokens, self.info.context_length - len(prompt))
            if limit <= 0:
                return
            sampler = Sampler(params)
            logits = self._backend.prefill(prompt)
            for produced in range(1, limit + 1):
                if stop.is_set():
                    return
                token = sampler(logits)
                if token in self._eos:
                    return
                emit(token)
                if produced == limit or stop.is_set():
                    return
                logits = self._backend.decode(token)
        except BaseException as exc:
            emit(exc)
        finally:
            emit(_DONE)

    async def close(self) -> None:
        """Stop taking streams, let the running job end, then free the backend."""
        if self._closed:
            return
        self._closed = True
        try:
            await asyncio.wrap_future(self._executor.submit(self._backend.close))
        finally:
            self._executor.shutdown(wait=False)
