"""TokenEngine: continuous batching of token generation over one ONNX session.

Sequences wait in a FIFO until the :class:`TokenBlockPool` can lend the blocks they will
need (prompt + max_tokens, reserved up front so a running sequence never runs out). Each
turn of the step loop runs one prefill run, then one decode step. The prefill run takes the
next prompt tokens of the sequences that joined, oldest first, right-padded to the widest,
up to ``prefill_tokens`` padded tokens (a longer prompt goes in chunks over several turns,
so running streams wait for one chunk at a time). The decode step runs every sequence
whose prompt is in the cache; sequences join and leave between steps.

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
from collections import deque
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from agentd.errors import Internal, InvalidArgument, ResourceExhausted
from agentd.generate.kv_pool import TokenBlockPool
from agentd.generate.sampling import Sampler
from agentd.generate.types import LMInfo, SamplingParams

__all__ = ["EngineObserver", "TokenEngine"]

_DONE = None
log = logging.getLogger("agentd.generate")


class EngineObserver(Protocol):
    """Where the engine reports timings (the Prometheus metrics implement it)."""

    def first_token(self, model: str, seconds: float) -> None: ...

    def token_gap(self, model: str, seconds: float) -> None: ...

    def sequence_finished(self, model: str, reason: str, tokens: int) -> None: ...


@dataclass(eq=False, slots=True)
class _Sequence:
    prompt: np.ndarray
    params: SamplingParams
    sampler: Sampler
    queue: asyncio.Queue
    submitted: float
    blocks: list[int] = field(default_factory=list)
    table: np.ndarray | None = None  # the blocks as an array, for building block tables
    length: int = 0  # tokens in the cache (below len(prompt) while the prompt is prefilled)
    chunk: int = 0  # prompt tokens in the prefill run planned for it
    generated: int = 0
    next_token: int = 0
    last_emit: float = 0.0
    cancelled: bool = False
    finished: bool = False


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
        import onnxruntime as ort

        self._session = session
        self._info = info
        self.pool = pool
        self.max_batch = max_batch
        self.lanes = lanes  # model runs at once: a step's batch is split across them
        self.max_waiting = max_waiting
        # Padded prompt tokens per prefill run: longer prompts are prefilled in chunks, one
        # run between two decode steps, so a long prompt delays running streams by one
        # chunk's run at a time, not by its whole prefill.
        self.prefill_tokens = prefill_tokens
        self._observer = observer
        self._eos = frozenset(info.eos_token_ids)
        self._keys = ort.OrtValue.ortvalue_from_numpy(pool.model_keys)
        self._values = ort.OrtValue.ortvalue_from_numpy(pool.model_values)
        self._decode_outputs: dict[tuple[int, int], tuple[np.ndarray, ...]] = {}
        self._waiting: deque[_Sequence] = deque()
        self._prefilling: list[_Sequence] = []  # admitted, prompt not all in the cache yet
        self._active: list[_Sequence] = []  # decoding
        self._in_flight: frozenset[_Sequence] = frozenset()
        self._executor = ThreadPoolExecutor(lanes, thread_name_prefix="agentd-tokens")
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.steps = 0  # graph runs, prefills included

    @property
    def info(self) -> LMInfo:
        return self._info

    def gauges(self) -> dict[str, float]:
        return {
            "active": len(self._active) + len(self._prefilling),
            "waiting": len(self._waiting),
            "blocks_free": self.pool.free,
            "blocks_used": self.pool.used,
        }

    # -- consumer side -------------------------------------------------------------------

    def check_request(self, prompt_len: int, params: SamplingParams) -> None:
        """Raise InvalidArgument when a request can never run here, ResourceExhausted when
        the queue of waiting sequences is full."""
        context = self._info.context_length
        if prompt_len < 1:
            raise InvalidArgument("the prompt is empty")
        if prompt_len >= context:
            raise InvalidArgument(
                f"the prompt is {prompt_len} tokens; this model's context is {context} tokens"
            )
        need = self.pool.blocks_for(min(prompt_len + params.max_tokens, context))
        if need > self.pool.total:
            raise InvalidArgument(
                f"prompt + max_tokens needs {need} cache blocks; the pool has {self.pool.total}"
            )
        if len(self._waiting) >= self.max_waiting:
            raise ResourceExhausted(
                f"{len(self._waiting)} sequences are already waiting for {self._info.name!r}"
            )

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams) -> AsyncIterator[int]:
        self.check_request(len(prompt_ids), params)
        return self._stream(np.asarray(prompt_ids, dtype=np.int64), params)

    async def _stream(self, prompt: np.ndarray, params: SamplingParams) -> AsyncIterator[int]:
        seq = _Sequence(
            prompt=prompt,
            params=params,
            sampler=Sampler(params),
            queue=asyncio.Queue(),
            submitted=time.perf_counter(),
        )
        self._ensure_running()
        self._waiting.append(seq)
        self._wake.set()
        try:
            while True:
                token = await seq.queue.get()
                if token is _DONE:
                    return
                if isinstance(token, Internal):
                    raise token
                yield token
        finally:
            self._abandon(seq)

    def _abandon(self, seq: _Sequence) -> None:
        if seq.finished:
            return
        seq.cancelled = True
        if seq in self._in_flight:
            return  # released when its step ends
        with contextlib.suppress(ValueError):
            self._waiting.remove(seq)
        self._release(seq, "cancelled")

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="token-engine")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    # -- the step loop -------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            self._admit()
            if not self._prefilling and not self._active:
                self._wake.clear()
                await self._wake.wait()
                continue
            planned = self._plan_prefill()
            if planned:
                await self._step(self._prefill, self._split(planned))
            if self._active:
                await self._step(self._decode, self._split(self._active))

    def _split(self, batch: list[_Sequence]) -> list[list[_Sequence]]:
        """The batch cut into one near-equal run per lane."""
        if not batch:
            return []
        count = min(self.lanes, len(batch))
        size, extra = divmod(len(batch), count)
        cuts = [0]
        for lane in range(count):
            cuts.append(cuts[-1] + size + (lane < extra))
        return [batch[cuts[i] : cuts[i + 1]] for i in range(count)]

    async def _step(self, work, groups: list[list[_Sequence]]) -> None:
        """Run ``work`` over each group at once, one lane each, and hand out the tokens.
        A model failure ends that group's sequences, not the engine."""
        if not groups:
            return
        loop = asyncio.get_running_loop()
        self._in_flight = frozenset(seq for group in groups for seq in group)
        try:
            results = await asyncio.gather(
                *(
                    loop.run_in_executor(self._executor, work, group, lane)
                    for lane, group in enumerate(groups)
                ),
                return_exceptions=True,
            )
        finally:
            self._in_flight = frozenset()
        self.steps += len(groups)
        for group, tokens in zip(groups, results, strict=True):
            if isinstance(tokens, BaseException):
                self._fail(group, tokens)
                continue
            for seq, token in zip(group, tokens, strict=True):
                self._deliver(seq, token)

    def _admit(self) -> None:
        """Move waiting sequences in, oldest first, while the batch and the pool have room."""
        context = self._info.context_length
        while self._waiting and len(self._active) + len(self._prefilling) < self.max_batch:
            seq = self._waiting[0]
            tokens = min(len(seq.prompt) + seq.params.max_tokens, context)
            blocks = self.pool.borrow(self.pool.blocks_for(tokens))
            if blocks is None:
                break  # the head waits for blocks; later ones must not overtake it
            self._waiting.popleft()
            seq.blocks = blocks
            seq.table = np.asarray(blocks, dtype=np.int64)
            self._prefilling.append(seq)

    def _plan_prefill(self) -> list[_Sequence]:
        """The sequences for the next prefill run, oldest first, each with its ``chunk``:
        rows right-padded to the widest chunk stay within ``prefill_tokens``. The oldest
        always gets a chunk (of at most ``prefill_tokens``)."""
        planned: list[_Sequence] = []
        width = 0
        budget = self.prefill_tokens
        for seq in self._prefilling:
            chunk = min(len(seq.prompt) - seq.length, budget)
            widest = max(width, chunk)
            if planned and widest * (len(planned) + 1) > budget:
                break
            seq.chunk = chunk
            planned.append(seq)
            width = widest
        return planned

    def _deliver(self, seq: _Sequence, token: int | None) -> None:
        if seq.cancelled:
            self._release(seq, "cancelled")
            return
        if token is None:
            return  # a prompt chunk went into the cache; more of the prompt to go
        if seq.generated == 0:
            self._prefilling.remove(seq)
        now = time.perf_counter()
        if token in self._eos:
            self._finish(seq, "stop")
            return
        seq.generated += 1
        if self._observer is not None:
            if seq.generated == 1:
                self._observer.first_token(self._info.name, now - seq.submitted)
            else:
                self._observer.token_gap(self._info.name, now - seq.last_emit)
        seq.last_emit = now
        seq.queue.put_nowait(token)
        seq.next_token = token
        if seq.generated >= seq.params.max_tokens or seq.length + 1 > self._info.context_length:
            self._finish(seq, "length")
        elif seq.generated == 1:
            self._active.append(seq)

    def _fail(self, batch: list[_Sequence], exc: BaseException) -> None:
        log.error("token engine step failed for %s: %s", self._info.name, exc)
        error = Internal(f"model {self._info.name!r} failed: {exc}")
        for seq in batch:
            seq.queue.put_nowait(error)
            self._release(seq, "error")

    def _finish(self, seq: _Sequence, reason: str) -> None:
        seq.queue.put_nowait(_DONE)
        self._release(seq, reason)

    def _release(self, seq: _Sequence, reason: str) -> None:
        if seq.finished:
            return
        seq.finished = True
        if seq.blocks:
            self.pool.give_back(seq.blocks)
            seq.blocks = []
        if seq in self._active:
            self._active.remove(seq)
        elif seq in self._prefilling:
            self._prefilling.remove(seq)
        if self._observer is not None:
            self._observer.sequence_finished(self._info.name, reason, seq.generated)
        if self._wake is not None and self._waiting:
            self._wake.set()

    # -- on the worker thread ------------------------------------------------------------

    def forward(
        self,
        ids: np.ndarray,
        positions: np.ndarray,
        past_len: np.ndarray,
        table: np.ndarray,
        lane: int = 0,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One run of the graph over the pool: logits of each row's last token and the new
        tokens' keys and values (to be written with ``pool.write``). The arrays are reused by
        the next run of the same batch size on the same ``lane`` (runs on different lanes may
        overlap). Blocking; the engine calls it on its worker threads."""
        binding = self._session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("positions", positions)
        binding.bind_cpu_input("past_len", past_len)
        binding.bind_cpu_input("block_table", table)
        binding.bind_ortvalue_input("k_cache", self._keys)
        binding.bind_ortvalue_input("v_cache", self._values)
        outputs = self._outputs(ids.shape[0], ids.shape[1], lane)
        for name, array in zip(("logits", "new_k", "new_v"), outputs, strict=True):
            binding.bind_output(name, "cpu", 0, np.float32, array.shape, array.ctypes.data)
        self._session.run_with_iobinding(binding)
        return outputs

    def _outputs(
        self, batch: int, tokens: int, lane: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Arrays the session writes its outputs into: kept per lane and batch size for
        decode steps (valid until that lane's next step), so a step allocates no output
        memory."""
        cached = self._decode_outputs.get((lane, batch)) if tokens == 1 else None
        if cached is None:
            pool = self.pool
            new = (pool.layers, batch, tokens, pool.heads, pool.head_dim)
            cached = (
                np.empty((batch, self._info.vocab_size), np.float32),
                np.empty(new, np.float32),
                np.empty(new, np.float32),
            )
            if tokens == 1:
                self._decode_outputs[lane, batch] = cached
        return cached

    def _prefill(self, group: list[_Sequence], lane: int) -> list[int | None]:
        """One run over the next ``chunk`` prompt tokens of each sequence in ``group``,
        right-padded to the widest (padding sits after each row's tokens, at position 0,
        so causal attention keeps it out of the real ones). A sequence whose prompt is now
        all in the cache gets its first token; the others None."""
        size = self.pool.block_size
        count = len(group)
        width = max(seq.chunk for seq in group)
        ids = np.zeros((count, width), np.int64)
        positions = np.zeros((count, width), np.int64)
        targets = np.zeros((count, width), np.int64)  # the block each token goes to
        real = np.zeros((count, width), bool)
        for row, seq in enumerate(group):
            chunk = seq.chunk
            span = np.arange(seq.length, seq.length + chunk)
            ids[row, :chunk] = seq.prompt[span]
            positions[row, :chunk] = span
            targets[row, :chunk] = seq.table[span // size]
            real[row, :chunk] = True
        past = np.fromiter((seq.length for seq in group), np.int64, count)
        table = self._block_table(group, past)
        logits, new_k, new_v = self.forward(ids, positions, past, table, lane)
        self.pool.write(targets[real], positions[real] % size, new_k[:, real], new_v[:, real])
        for seq in group:
            seq.length += seq.chunk
        return self._sample(group, logits)

    def _decode(self, batch: list[_Sequence], lane: int) -> list[int | None]:
        size = self.pool.block_size
        count = len(batch)
        lengths = np.fromiter((seq.length for seq in batch), np.int64, count)
        ids = np.fromiter((seq.next_token for seq in batch), np.int64, count)[:, None]
        table = self._block_table(batch, lengths)
        # The block each new token goes to (may lie past the table when a block just filled).
        targets = np.fromiter((seq.table[seq.length // size] for seq in batch), np.int64, count)
        logits, new_k, new_v = self.forward(ids, lengths[:, None], lengths, table, lane)
        self.pool.write(targets, lengths % size, new_k[:, :, 0], new_v[:, :, 0])
        for seq in batch:
            seq.length += 1
        return self._sample(batch, logits)

    def _block_table(self, batch: list[_Sequence], lengths: np.ndarray) -> np.ndarray:
        """Each sequence's blocks holding its ``lengths`` cached tokens, zero-padded (the
        graph masks slots at and past each row's length)."""
        used = np.maximum(1, -(-lengths // self.pool.block_size))
        table = np.zeros((len(batch), int(used.max())), np.int64)
        for row, seq in enumerate(batch):
            table[row, : used[row]] = seq.table[: used[row]]
        return table

    @staticmethod
    def _sample(batch: list[_Sequence], logits: np.ndarray) -> list[int | None]:
        """The next token of each sequence: one argmax over the batch for greedy rows, a
        draw from their own sampler for the others, None (and no draw, so a seeded
        sampler's draws stay the same) while part of the prompt is not in the cache."""
        picks: list[int | None] = logits.argmax(axis=1).tolist()
        for row, seq in enumerate(batch):
            if seq.length < len(seq.prompt):
                picks[row] = None
            elif not seq.sampler.greedy:
                picks[row] = seq.sampler(logits[row])
        return picks
