"""SerialGenerator: one sequence at a time on a worker thread, streamed to asyncio."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest

from agentd.errors import FailedPrecondition, InvalidArgument
from agentd.generate.serial import SerialGenerator
from agentd.generate.types import LMInfo, SamplingParams, TextGenerator

VOCAB = 32
EOS = 1
GREEDY = SamplingParams(temperature=0.0, max_tokens=64)


class CountingBackend:
    """A deterministic SequenceBackend: the next token is the last one plus 1 (mod VOCAB),
    skipping EOS unless ``eos_after`` tokens were decoded. Records every call."""

    def __init__(self, *, delay: float = 0.0, eos_after: int | None = None) -> None:
        self.info = LMInfo("counting", "test", 40, VOCAB, (EOS,))
        self.delay = delay
        self.eos_after = eos_after
        self.calls: list[tuple[str, int]] = []
        self.closed = False
        self._steps = 0
        self._threads: set[int] = set()

    def _logits(self, last: int) -> np.ndarray:
        nxt = (last + 1) % VOCAB
        if nxt == EOS:
            nxt = EOS + 1
        if self.eos_after is not None and self._steps >= self.eos_after:
            nxt = EOS
        logits = np.zeros(VOCAB, dtype=np.float32)
        logits[nxt] = 10.0
        return logits

    def prefill(self, prompt_ids: Sequence[int]) -> np.ndarray:
        self._threads.add(threading.get_ident())
        self.calls.append(("prefill", prompt_ids[-1]))
        self._steps = 0
        time.sleep(self.delay)
        return self._logits(prompt_ids[-1])

    def decode(self, token_id: int) -> np.ndarray:
        self._threads.add(threading.get_ident())
        self.calls.append(("decode", token_id))
        self._steps += 1
        time.sleep(self.delay)
        return self._logits(token_id)

    def close(self) -> None:
        self.closed = True


async def collect(
    generator: SerialGenerator, prompt: list[int], params: SamplingParams
) -> list[int]:
    return [token async for token in generator.stream(prompt, params)]


async def test_is_a_text_generator() -> None:
    generator = SerialGenerator(CountingBackend())
    assert isinstance(generator, TextGenerator)
    assert generator.info.name == "counting"
    await generator.close()


async def test_max_tokens() -> None:
    backend = CountingBackend()
    generator = SerialGenerator(backend)
    tokens = await collect(generator, [0, 5], SamplingParams(temperature=0.0, max_tokens=7))
    assert tokens == [6, 7, 8, 9, 10, 11, 12]
    # No decode is spent on a token nobody will see.
    assert [kind for kind, _ in backend.calls].count("decode") == 6
    assert await collect(generator, [0, 5], SamplingParams(temperature=0.0, max_tokens=0)) == []
    await generator.close()


async def test_stops_at_eos_without_yielding_it() -> None:
    generator = SerialGenerator(CountingBackend(eos_after=3))
    assert await collect(generator, [0, 20], GREEDY) == [21, 22, 23]
    await generator.close()


async def test_stops_at_the_end_of_the_context() -> None:
    generator = SerialGenerator(CountingBackend())
    prompt = [2] * 35  # context_length is 40
    assert len(await collect(generator, prompt, GREEDY)) == 5
    with pytest.raises(InvalidArgument, match="at most 39"):
        await collect(generator, [2] * 40, GREEDY)
    await generator.close()


async def test_rejects_bad_prompts() -> None:
    generator = SerialGenerator(CountingBackend())
    with pytest.raises(InvalidArgument, match="at least one token"):
        await collect(generator, [], GREEDY)
    with pytest.raises(InvalidArgument, match="outside the vocabulary"):
        await collect(generator, [0, VOCAB], GREEDY)
    await generator.close()


async def test_closing_the_iterator_stops_the_thread() -> None:
    backend = CountingBackend(delay=0.02)
    generator = SerialGenerator(backend)
    stream = generator.stream([0, 2], GREEDY)
    received = [await anext(stream) for _ in range(3)]
    assert received == [3, 4, 5]
    await stream.aclose()
    await asyncio.sleep(0.15)  # several decode steps' worth
    decodes = len(backend.calls)
    await asyncio.sleep(0.1)
    assert len(backend.calls) == decodes  # the worker stopped
    # Far short of max_tokens (64): the worker may run a few tokens ahead of the consumer.
    assert decodes < 15
    # The generator stays usable.
    assert await collect(generator, [0, 2], SamplingParams(temperature=0.0, max_tokens=2)) == [3, 4]
    await generator.close()


async def test_cancelling_the_consumer_stops_the_thread() -> None:
    backend = CountingBackend(delay=0.02)
    generator = SerialGenerator(backend)
    first = asyncio.Event()

    async def consume() -> None:
        async for _token in generator.stream([0, 2], GREEDY):
            first.set()

    task = asyncio.create_task(consume())
    await first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.1)
    calls = len(backend.calls)
    await asyncio.sleep(0.1)
    assert len(backend.calls) == calls < 10
    await generator.close()


async def test_concurrent_streams_run_one_after_another() -> None:
    backend = CountingBackend(delay=0.002)
    generator = SerialGenerator(backend)
    params = SamplingParams(temperature=0.0, max_tokens=5)
    prompts = [[0, 2], [0, 10], [0, 20]]
    results = await asyncio.gather(*(collect(generator, p, params) for p in prompts))
    assert results == [[3, 4, 5, 6, 7], [11, 12, 13, 14, 15], [21, 22, 23, 24, 25]]
    # Each prefill is followed by its own four decodes before the next sequence starts.
    kinds = [kind for kind, _ in backend.calls]
    assert kinds == (["prefill"] + ["decode"] * 4) * 3
    assert len(backend._threads) == 1
    await generator.close()


async def test_abandoned_waiting_stream_never_runs() -> None:
    backend = CountingBackend(delay=0.02)
    generator = SerialGenerator(backend)
    params = SamplingParams(temperature=0.0, max_tokens=4)
    running = asyncio.create_task(collect(generator, [0, 2], params))
    waiting = asyncio.create_task(collect(generator, [0, 10], params))
    await asyncio.sleep(0.01)
    waiting.cancel()
    assert await running == [3, 4, 5, 6]
    await asyncio.sleep(0.05)
    assert ("prefill", 10) not in backend.calls
    await generator.close()


async def test_backend_errors_reach_the_consumer() -> None:
    class Failing(CountingBackend):
        def decode(self, token_id: int) -> np.ndarray:
            raise RuntimeError("decode failed")

    generator = SerialGenerator(Failing())
    received: list[int] = []
    with pytest.raises(RuntimeError, match="decode failed"):
        async for token in generator.stream([0, 2], GREEDY):
            received.append(token)
    assert received == [3]
    await generator.close()


async def test_close_frees_the_backend_and_refuses_new_streams() -> None:
    backend = CountingBackend()
    generator = SerialGenerator(backend)
    await generator.close()
    assert backend.closed
    with pytest.raises(FailedPrecondition, match="closed"):
        await collect(generator, [0, 2], GREEDY)
    await generator.close()  # idempotent
