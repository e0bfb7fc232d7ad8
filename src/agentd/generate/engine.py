"""TokenEngine: continuous batching of token generation over one ONNX session.

The engine is the step loop between two parts: the :class:`~agentd.generate.scheduler.
Scheduler` (pure Python: admission by free KV blocks, prefill planning, decode batches, the
end of sequences) and the :class:`~agentd.generate.onnx_runner.OnnxRunner` (a step's
tensors, the session run, sampling). Each turn of the loop admits what fits, runs one
prefill run (the next prompt chunks of the sequences that joined), then one decode step
(every sequence whose prompt is in the cache); sequences join and leave between steps.

Every run is split into one near-equal run per lane; the lanes run at once on their own
worker threads (one single-threaded onnxruntime run per core beats one run on an intra-op
pool for a small model; see docs/generate.md). Model runs, cache writes and sampling happen
on those threads, each lane on its own sequences' blocks; the event loop only hands tokens
to consumers.

A consumer that stops reading (client disconnect, cancellation) releases its blocks at once,
or at the end of the run in flight if its sequence is part of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from agentd.errors import AgentdError, Internal
from agentd.generate.kv_pool import TokenBlockPool
from agentd.generate.sampling import Sampler
from agentd.generate.scheduler import Outcome, Scheduler
from agentd.generate.scheduler import Sequence as _Sequence
from agentd.generate.types import LMInfo, SamplingParams

__all__ = ["EngineObserver", "TokenEngine"]

_DONE = None
log = logging.getLogger("agentd.generate")


class EngineObserver(Protocol):
    """Where the engine reports timings (the Prometheus metrics implement it)."""

    def first_token(self, model: str, seconds: float) -> None: ...

    def token_gap(self, model: str, seconds: float) -> None: ...

    def sequence_finished(self, model: str, reason: str, tokens: int) -> None: ...


@dataclass(eq=False, slots=True, kw_only=True)
class _Stream(_Sequence):
    """A sequence with what the runner needs (its sampler, its blocks as an array) and its
    consumer (the queue its tokens go to, its timings)."""

    sampler: Sampler
    table: Any = None  # np.ndarray of its blocks (set on admission), for block tables
    # Tokens, then _DONE or the error that ended the sequence.
    queue: asyncio.Queue[int | AgentdError | None] = field(default_factory=asyncio.Queue)
    submitted: float = 0.0
    last_emit: float = 0.0


class TokenEngine:
    """A :class:`~agentd.generate.types.TextGenerator` over a paged-cache ONNX graph."""

    def __init__(
        self,
        session,  # onnxruntime.InferenceSession of a graph from onnx_export (paged layout)
        info: LMInfo,
        pool: TokenBlockPool,
        *,
        max_batch: int = 64,
        lanes: int = 1,
        max_waiting: int = 4096,
        prefill_tokens: int = 256,
        observer: EngineObserver | None = None,
    ) -> None:
        self._info = info
        self.pool = pool
        self.lanes = lanes  # model runs at once: a step's batch is split across them
        self.scheduler: Scheduler[_Stream] = Scheduler(
            pool,
            context_length=info.context_length,
            eos_token_ids=info.eos_token_ids,
            max_batch=max_batch,
            prefill_tokens=prefill_tokens,
            max_waiting=max_waiting,
            prefix_cache=pool.prefix_cache,
        )
        # Imported here: importing the engine (or the generation service) loads no
        # onnxruntime until an engine is built.
        from agentd.generate.onnx_runner import OnnxRunner

        self.runner = OnnxRunner(session, pool, name=info.name, vocab_size=info.vocab_size)
        self._observer = observer
        self._executor = ThreadPoolExecutor(lanes, thread_name_prefix="agentd-tokens")
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.steps = 0  # graph runs, prefills included
        self.tokens_generated = 0  # for the node's tokens/s (cluster status)

    @property
    def info(self) -> LMInfo:
        return self._info

    # The scheduler's limits, settable on the engine as before the split.
    @property
    def max_batch(self) -> int:
        return self.scheduler.max_batch

    @max_batch.setter
    def max_batch(self, value: int) -> None:
        self.scheduler.max_batch = value

    @property
    def max_waiting(self) -> int:
        return self.scheduler.max_waiting

    @max_waiting.setter
    def max_waiting(self, value: int) -> None:
        self.scheduler.max_waiting = value

    @property
    def prefill_tokens(self) -> int:
        """Padded prompt tokens per prefill run: longer prompts are prefilled in chunks, one
        run between two decode steps, so a long prompt delays running streams by one
        chunk's run at a time, not by its whole prefill."""
        return self.scheduler.prefill_tokens

    @prefill_tokens.setter
    def prefill_tokens(self, value: int) -> None:
        self.scheduler.prefill_tokens = value

    def gauges(self) -> dict[str, float]:
        scheduler = self.scheduler
        return {
            "active": len(scheduler.running) + len(scheduler.prefilling),
            "waiting": len(scheduler.waiting),
            "blocks_free": self.pool.free,
            "blocks_used": self.pool.used,
            "tokens_generated": self.tokens_generated,
            "prefix_cache_queries": scheduler.prefix_queries,
            "prefix_cache_hits": scheduler.prefix_hits,
        }

    def forward(
        self,
        ids: np.ndarray,
        positions: np.ndarray,
        past_len: np.ndarray,
        table: np.ndarray,
        lane: int = 0,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One run of the graph over the pool (see :meth:`OnnxRunner.forward`)."""
        return self.runner.forward(ids, positions, past_len, table, lane)

    # -- consumer side -------------------------------------------------------------------

    def check_request(self, prompt_len: int, params: SamplingParams) -> None:
        """Raise InvalidArgument when a request can never run here, ResourceExhausted when
        the queue of waiting sequences is full."""
        self.scheduler.check(prompt_len, params.max_tokens, repr(self._info.name))

    def stream(
        self, prompt_ids: Sequence[int], params: SamplingParams
    ) -> AsyncGenerator[int, None]:
        self.check_request(len(prompt_ids), params)
        return self._stream(np.asarray(prompt_ids, dtype=np.int64), params)

    async def _stream(
        self, prompt: np.ndarray, params: SamplingParams
    ) -> AsyncGenerator[int, None]:
        seq = _Stream(
            prompt=prompt,
            max_tokens=params.max_tokens,
            sampler=Sampler(params),
            submitted=time.perf_counter(),
        )
        wake = self._ensure_running()
        self.scheduler.add(seq)
        wake.set()
        queue = seq.queue
        try:
            while True:
                token = await queue.get()
                if token is _DONE:
                    return
                if isinstance(token, AgentdError):
                    raise token
                yield token
        finally:
            if self.scheduler.abandon(seq):
                self._ended(seq, "cancelled")

    def _ensure_running(self) -> asyncio.Event:
        """The step loop's wake-up event; starts the loop (with a new one) if not running."""
        wake = self._wake
        if wake is None or self._task is None or self._task.done():
            wake = self._wake = asyncio.Event()
            loop = asyncio.get_running_loop()
            self._task = loop.create_task(self._run(wake), name="token-engine")
        return wake

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    # -- the step loop -------------------------------------------------------------------

    async def _run(self, wake: asyncio.Event) -> None:
        scheduler, runner, lanes = self.scheduler, self.runner, self.lanes
        while True:
            for seq in scheduler.admit():
                runner.admitted(seq)
            if not scheduler.has_work():
                wake.clear()
                await wake.wait()
                continue
            planned = scheduler.plan_prefill()
            if planned:
                await self._step(runner.prefill, scheduler.split(planned, lanes), prefill=True)
            if scheduler.running:
                await self._step(runner.decode, scheduler.split(scheduler.running, lanes))

    async def _step(self, work, groups: list[list[_Stream]], *, prefill: bool = False) -> None:
        """Run ``work`` over each group at once, one lane each, and hand out the tokens.
        A model failure ends that group's sequences, not the engine. After a ``prefill``
        run, the prompt blocks it filled go into the prefix cache (not a failed run's)."""
        if not groups:
            return
        loop = asyncio.get_running_loop()
        scheduler = self.scheduler
        scheduler.begin_step(groups)
        try:
            results = await asyncio.gather(
                *(
                    loop.run_in_executor(self._executor, work, group, lane)
                    for lane, group in enumerate(groups)
                ),
                return_exceptions=True,
            )
        finally:
            scheduler.end_step()
        self.steps += len(groups)
        for group, tokens in zip(groups, results, strict=True):
            if isinstance(tokens, BaseException):
                self._fail(group, tokens)
                continue
            if prefill and scheduler.prefix_cache:
                for seq in group:
                    scheduler.prefilled(seq)
            for seq, token in zip(group, tokens, strict=True):
                self._deliver(seq, token)

    def _deliver(self, seq: _Stream, token: int | None) -> None:
        if seq.cancelled:
            self._release(seq, "cancelled")
            return
        if token is None:
            return  # a prompt chunk went into the cache; more of the prompt to go
        outcome = self.scheduler.update(seq, token)
        if outcome is Outcome.STOP:
            self._finish(seq, "stop")
            return
        self.tokens_generated += 1
        now = time.perf_counter()
        observer = self._observer
        if observer is not None:
            if seq.generated == 1:
                observer.first_token(self._info.name, now - seq.submitted)
            else:
                observer.token_gap(self._info.name, now - seq.last_emit)
        seq.last_emit = now
        seq.queue.put_nowait(token)
        if outcome is Outcome.LENGTH:
            self._finish(seq, "length")

    def _fail(self, batch: list[_Stream], exc: BaseException) -> None:
        """A run failed (the runner raised agentd's error, chained from onnxruntime's):
        each of its sequences ends with its own copy of that error."""
        log.error("token engine step failed for %s: %s", self._info.name, exc)
        for seq in batch:
            if isinstance(exc, AgentdError):
                error = type(exc)(exc.message)
                error.__cause__ = exc.__cause__
            else:  # a bug in the engine itself
                error = Internal(f"model {self._info.name!r} failed: {exc}")
                error.__cause__ = exc
            seq.queue.put_nowait(error)
            self._release(seq, "error")

    def _finish(self, seq: _Stream, reason: str) -> None:
        seq.queue.put_nowait(_DONE)
        self._release(seq, reason)

    def _release(self, seq: _Stream, reason: str) -> None:
        if self.scheduler.finish(seq):
            self._ended(seq, reason)

    def _ended(self, seq: _Stream, reason: str) -> None:
        if self._observer is not None:
            self._observer.sequence_finished(self._info.name, reason, seq.generated)
        if self._wake is not None and self.scheduler.waiting:
            self._wake.set()
