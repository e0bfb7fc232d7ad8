"""A GGUF model served with continuous batching through llama.cpp's multi-sequence batch.

llama.cpp keeps one KV cache per context; its cells carry sequence ids, so one context holds
up to ``n_seq_max`` independent sequences and one ``llama_decode`` evaluates tokens of many
of them at once. :class:`GGUFEngine` uses that as the ONNX token engine uses its block pool:

- each admitted sequence takes a *slot* (a llama.cpp sequence id, ``0..max_batch-1``);
  the context is created with ``n_seq_max = max_batch`` and a non-unified KV cache of
  ``n_ctx = max_batch * context_length`` cells, so every slot holds a whole context of its
  own (``llama_n_ctx_seq``) and no sequence can run out of cells mid-way;
- each step is one ``llama_decode`` carrying every running sequence's next token plus the
  next prompt chunks of sequences that joined (within ``prefill_tokens``); sequences join
  and leave between steps;
- the next token is picked by agentd's :class:`~agentd.generate.sampling.Sampler` on the
  logits row of each sequence (``llama_get_logits_ith``), so sampling options behave the
  same on every platform;
- a sequence that ends or whose consumer leaves has its KV removed
  (``llama_memory_seq_rm``) at once, or right after the step in flight if it is part of it,
  and its slot is free for the next one.

Model runs happen on one worker thread (llama.cpp parallelises inside a run over its own
``threads``); the event loop only plans steps and hands tokens to consumers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agentd.errors import (
    AgentdError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from agentd.generate.config import LMConfig
from agentd.generate.engine import EngineObserver
from agentd.generate.gguf_backend import _INSTALL_HINT, _LOAD_LOCK
from agentd.generate.sampling import Sampler
from agentd.generate.serial import checked_prompt
from agentd.generate.types import LMInfo, SamplingParams, TextGenerator

__all__ = ["GGUFEngine", "kv_cells_needed", "load_gguf_lm"]

log = logging.getLogger("agentd.generate")
_DONE = None
# llama.cpp's own limit on sequence ids in one context (LLAMA_MAX_SEQ).
MAX_SEQUENCES = 256


def kv_cells_needed(max_batch: int, context_length: int) -> int:
    """The ``n_ctx`` (KV cells) a batched GGUF model is created with: a whole context per
    sequence slot."""
    return max_batch * context_length


@dataclass(eq=False, slots=True)
class _Seq:
    prompt: list[int]
    max_tokens: int
    sampler: Sampler
    queue: asyncio.Queue[int | AgentdError | None] = field(default_factory=asyncio.Queue)
    slot: int = -1  # llama.cpp sequence id while admitted
    length: int = 0  # tokens in its KV (below len(prompt) while the prompt goes in)
    generated: int = 0
    next_token: int = 0  # the last token generated: the next step's input
    row: int = -1  # its logits row in the step in flight; -1: a prompt chunk, no token yet
    cancelled: bool = False
    finished: bool = False
    submitted: float = 0.0
    last_emit: float = 0.0


class GGUFEngine:
    """A :class:`~agentd.generate.types.TextGenerator` over one llama.cpp context."""

    def __init__(
        self,
        path: Path,
        name: str,
        *,
        context_length: int = 0,
        max_batch: int = 16,
        threads: int = 2,
        prefill_tokens: int = 256,
        max_waiting: int = 4096,
        observer: EngineObserver | None = None,
    ) -> None:
        """``context_length`` 0 takes the model's own (its training context); a larger one
        is cut to it. The KV cache holds ``max_batch * context_length`` cells."""
        try:
            import llama_cpp
        except ImportError:
            raise FailedPrecondition(
                f"GGUF models need llama-cpp-python; {_INSTALL_HINT}"
            ) from None
        if not 1 <= max_batch <= MAX_SEQUENCES:
            raise InvalidArgument(
                f"max_batch must be in 1..{MAX_SEQUENCES} for a GGUF model, got {max_batch}"
            )
        self._ll = llama_cpp
        path = Path(path)
        if not path.is_file():
            raise InvalidArgument(f"no GGUF file at {path}")
        self.max_batch = max_batch
        self.prefill_tokens = max(1, prefill_tokens)
        self.max_waiting = max_waiting
        self._model = self._ctx = None
        self._batch: Any = None
        try:
            with _LOAD_LOCK:
                self._load(path, context_length, threads)
        except AgentdError:
            self._free()
            raise
        except MemoryError as exc:
            self._free()
            raise ResourceExhausted(f"not enough memory to load GGUF model {path}") from exc
        vocab = llama_cpp.llama_model_get_vocab(self._model)
        eos = int(llama_cpp.llama_vocab_eos(vocab))
        self._info = LMInfo(
            name=name,
            platform="gguf",
            context_length=self._context,
            vocab_size=int(llama_cpp.llama_vocab_n_tokens(vocab)),
            eos_token_ids=(eos,) if eos >= 0 else (),
        )
        self._eos = frozenset(self._info.eos_token_ids)
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._free_slots: deque[int] = deque(range(max_batch))
        self._waiting: deque[_Seq] = deque()
        self._active: list[_Seq] = []  # admitted, in admission order
        self._in_flight: frozenset[_Seq] = frozenset()
        self._stepping = False  # a llama_decode is running on the worker
        self._dirty: list[int] = []  # slots of sequences that ended during that run
        self._step: Future[list[int]] | None = None  # that run
        self._observer = observer
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"agentd-gguf-{name}")
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closed = False
        self.steps = 0
        self.tokens_generated = 0

    def _load(self, path: Path, context_length: int, threads: int) -> None:
        ll = self._ll
        from llama_cpp._logger import set_verbose
        from llama_cpp._utils import suppress_stdout_stderr

        set_verbose(False)  # llama.cpp's log callback: errors only (Llama(verbose=False) too)
        # llama.cpp logs its load to stderr; silenced as llama_cpp.Llama(verbose=False) does.
        with suppress_stdout_stderr(disable=False):
            ll.llama_backend_init()
            model_params = ll.llama_model_default_params()
            self._model = ll.llama_model_load_from_file(str(path).encode(), model_params)
            if not self._model:
                raise InvalidArgument(f"cannot load GGUF model {path}: llama.cpp refused it")
            trained = int(ll.llama_model_n_ctx_train(self._model))
            context = trained if context_length <= 0 else min(context_length, trained)
            params = ll.llama_context_default_params()
            params.n_ctx = kv_cells_needed(self.max_batch, context)
            params.n_seq_max = self.max_batch
            params.kv_unified = False  # a KV stream per sequence: attention over its own cells
            params.n_batch = params.n_ubatch = self.prefill_tokens + self.max_batch
            params.n_threads = params.n_threads_batch = threads
            params.no_perf = True
            self._ctx = ll.llama_init_from_model(self._model, params)
            if not self._ctx:
                raise ResourceExhausted(
                    f"llama.cpp could not create a context of {params.n_ctx} KV cells "
                    f"({self.max_batch} sequences x {context} tokens) for {path}"
                )
        # llama.cpp may round the cells up; each sequence still gets at most ``context``.
        self._context = min(context, int(ll.llama_n_ctx_seq(self._ctx)))
        # A step carries at most one token per running sequence plus prefill_tokens.
        self._batch = ll.llama_batch_init(self.prefill_tokens + self.max_batch, 0, 1)

    def _free(self) -> None:
        ll = self._ll
        if self._batch is not None:
            ll.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            ll.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            ll.llama_model_free(self._model)
            self._model = None

    @property
    def info(self) -> LMInfo:
        return self._info

    def gauges(self) -> dict[str, float]:
        return {
            "active": len(self._active),
            "waiting": len(self._waiting),
            # A slot is one "block" holding a whole context: the pool's gauges in slots.
            "blocks_free": len(self._free_slots),
            "blocks_used": self.max_batch - len(self._free_slots),
            "tokens_generated": self.tokens_generated,
        }

    def kv_tokens(self, slot: int) -> int:
        """Tokens the KV cache holds for sequence id ``slot`` (0 when it is free)."""
        return int(self._ll.llama_memory_seq_pos_max(self._mem, slot)) + 1

    # -- consumer side -------------------------------------------------------------------

    def check_request(self, prompt_ids: Sequence[int], params: SamplingParams) -> list[int]:
        """The prompt as a list; InvalidArgument when it can never run here,
        ResourceExhausted when the queue of waiting sequences is full."""
        if self._closed:
            raise FailedPrecondition(f"model {self._info.name!r} is closed")
        info = self._info
        prompt = checked_prompt(info, prompt_ids)
        if len(self._waiting) >= self.max_waiting:
            raise ResourceExhausted(
                f"{len(self._waiting)} sequences are already waiting for {info.name!r}"
            )
        return prompt

    def stream(
        self, prompt_ids: Sequence[int], params: SamplingParams
    ) -> AsyncGenerator[int, None]:
        prompt = self.check_request(prompt_ids, params)
        return self._stream(prompt, params)

    async def _stream(self, prompt: list[int], params: SamplingParams) -> AsyncGenerator[int, None]:
        if self._closed:  # closed between stream() and the first read
            raise Unavailable(f"model {self._info.name!r} was closed")
        seq = _Seq(
            prompt=prompt,
            max_tokens=params.max_tokens,
            sampler=Sampler(params),
            submitted=time.perf_counter(),
        )
        wake = self._ensure_running()
        self._waiting.append(seq)
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
            self._abandon(seq)

    def _abandon(self, seq: _Seq) -> None:
        """Its consumer went away: end it now, or after the step in flight if it is in it."""
        if seq.finished:
            return
        seq.cancelled = True
        if seq in self._in_flight:
            return  # the step writes its KV; _deliver releases it
        with contextlib.suppress(ValueError):
            self._waiting.remove(seq)
        self._release(seq, "cancelled")

    def _ensure_running(self) -> asyncio.Event:
        wake = self._wake
        if wake is None or self._task is None or self._task.done():
            wake = self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(
                self._run(wake), name=f"gguf-engine-{self._info.name}"
            )
        return wake

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # Streams still open end with an error rather than wait for tokens forever.
        for seq in [*self._waiting, *self._active]:
            if not seq.finished:
                seq.finished = True
                seq.queue.put_nowait(Unavailable(f"model {self._info.name!r} was closed"))
        # The step in flight (if any) ends before the context is freed.
        await asyncio.wrap_future(self._executor.submit(self._free))
        self._executor.shutdown(wait=False)

    # -- the step loop -------------------------------------------------------------------

    async def _run(self, wake: asyncio.Event) -> None:
        if self._step is not None:
            # A step left running when the previous loop's task was cancelled (its event
            # loop ended): let it end before anything touches the KV cache again.
            await asyncio.wrap_future(self._step)
            self._step_ended()
            for seq in [seq for seq in self._active if seq.cancelled]:
                self._release(seq, "cancelled")
        while True:
            self._admit()
            if not self._active:
                wake.clear()
                await wake.wait()
                continue
            plan = self._plan()
            self._in_flight = frozenset(seq for seq, _ in plan)
            self._stepping = True
            self._step = self._executor.submit(self._decode, plan)
            try:
                result: list[int] | BaseException = await asyncio.wrap_future(self._step)
            except asyncio.CancelledError:
                # close() or the loop's end: the worker may still be decoding, so the KV
                # cache stays untouched (close frees the context after it, on the worker).
                raise
            except BaseException as exc:
                result = exc
            self._step_ended()
            self.steps += 1
            if isinstance(result, BaseException):
                self._fail([seq for seq, _ in plan], result)
                continue
            for (seq, _), token in zip(plan, result, strict=True):
                self._deliver(seq, token)

    def _step_ended(self) -> None:
        self._step = None
        self._in_flight = frozenset()
        self._stepping = False
        self._reclaim()

    def _reclaim(self) -> None:
        """Event loop, no step in flight: drop ended sequences' KV, free their slots."""
        for slot in self._dirty:
            self._ll.llama_memory_seq_rm(self._mem, slot, -1, -1)
            self._free_slots.append(slot)
        self._dirty.clear()

    def _admit(self) -> None:
        while self._waiting and self._free_slots:
            seq = self._waiting.popleft()
            seq.slot = self._free_slots.popleft()
            self._active.append(seq)

    def _plan(self) -> list[tuple[_Seq, list[int]]]:
        """The next step: each running sequence's next token, then prompt chunks of the
        admitted ones, oldest first, within ``prefill_tokens``."""
        plan: list[tuple[_Seq, list[int]]] = []
        budget = self.prefill_tokens
        for seq in self._active:
            if seq.length >= len(seq.prompt):
                plan.append((seq, [seq.next_token]))
        for seq in self._active:
            left = len(seq.prompt) - seq.length
            if left > 0 and budget > 0:
                chunk = seq.prompt[seq.length : seq.length + min(left, budget)]
                budget -= len(chunk)
                plan.append((seq, chunk))
        return plan

    def _decode(self, plan: list[tuple[_Seq, list[int]]]) -> list[int]:
        """Worker thread: one llama_decode over ``plan``; the next token of each sequence
        whose prompt is now all in (-1 for a prompt chunk with more to come)."""
        ll, batch = self._ll, self._batch
        n = 0
        rows: list[int] = []
        for seq, tokens in plan:
            pos = seq.length
            for token in tokens:
                batch.token[n] = token
                batch.pos[n] = pos
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq.slot
                batch.logits[n] = 0
                n += 1
                pos += 1
            done = pos >= len(seq.prompt)
            if done:
                batch.logits[n - 1] = 1
            rows.append(n - 1 if done else -1)
        batch.n_tokens = n
        status = ll.llama_decode(self._ctx, batch)
        if status != 0:
            raise Internal(
                f"model {self._info.name!r}: llama_decode failed with status {status} "
                f"({n} tokens of {len(plan)} sequences)"
            )
        vocab = self._info.vocab_size
        tokens_out: list[int] = []
        for (seq, tokens), row in zip(plan, rows, strict=True):
            seq.length += len(tokens)
            if row < 0:
                tokens_out.append(-1)
                continue
            pointer = ll.llama_get_logits_ith(self._ctx, row)
            # A view of llama.cpp's buffer, read before the next decode overwrites it.
            logits = np.ctypeslib.as_array(pointer, shape=(vocab,))
            tokens_out.append(seq.sampler(logits))
        return tokens_out

    def _deliver(self, seq: _Seq, token: int) -> None:
        if seq.cancelled:
            self._release(seq, "cancelled")
            return
        if token < 0:
            return  # a prompt chunk went in; more of the prompt to go
        if token in self._eos:
            self._finish(seq, "stop")
            return
        seq.generated += 1
        seq.next_token = token
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
        # As the serial path: prompt and generated tokens together fill the context at most.
        if (
            seq.generated >= seq.max_tokens
            or len(seq.prompt) + seq.generated >= self._info.context_length
        ):
            self._finish(seq, "length")

    def _fail(self, batch: list[_Seq], exc: BaseException) -> None:
        log.error("GGUF engine step failed for %s: %s", self._info.name, exc)
        for seq in batch:
            if isinstance(exc, AgentdError):
                error = type(exc)(exc.message)
            else:
                error = Internal(f"model {self._info.name!r} failed: {exc}")
            error.__cause__ = exc
            seq.queue.put_nowait(error)
            self._release(seq, "error")

    def _finish(self, seq: _Seq, reason: str) -> None:
        seq.queue.put_nowait(_DONE)
        self._release(seq, reason)

    def _release(self, seq: _Seq, reason: str) -> None:
        """End ``seq``: its KV is removed and its slot freed, now or (when a step is in
        flight: llama.cpp's KV cache is not safe to change during a decode) right after it."""
        if seq.finished:
            return
        seq.finished = True
        if seq.slot >= 0:
            self._active.remove(seq)
            self._dirty.append(seq.slot)
            seq.slot = -1
            if not self._stepping:
                self._reclaim()
        if self._observer is not None:
            self._observer.sequence_finished(self._info.name, reason, seq.generated)
        if self._wake is not None and self._waiting:
            self._wake.set()


def load_gguf_lm(
    config: LMConfig, *, threads: int = 2, observer: EngineObserver | None = None
) -> TextGenerator:
    """A GGUF model folder's generator (blocking): batched by default, one sequence at a
    time through :class:`~agentd.generate.serial.SerialGenerator` with ``batched: false``."""
    if not config.batched:
        from agentd.generate.gguf_backend import load_gguf

        return load_gguf(config.model_path, config.name)
    return GGUFEngine(
        config.model_path,
        config.name,
        context_length=config.context_length,
        max_batch=config.max_batch,
        threads=threads,
        prefill_tokens=config.prefill_tokens,
        observer=observer,
    )
