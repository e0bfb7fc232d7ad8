"""The token engine's scheduler: which sequences run each step, and when they end.

Pure Python (no onnxruntime, no numpy, no event loop), so it is unit-tested against a fake
block pool (tests/generate/test_scheduler.py), as vLLM tests its scheduler.

A sequence waits in a FIFO until the :class:`BlockPool` can lend the blocks it will need
(prompt + max_tokens, reserved up front so a running sequence never runs out); the head of
the queue waits for blocks and later ones do not overtake it. Admitted, it is *prefilling*
until its whole prompt is in the cache, then *running* (one token per decode step) until it
stops (end of sequence), reaches its length (max_tokens or the context), fails or is
abandoned by its consumer; then its blocks go back to the pool at once, or at the end of
the step in flight when it is part of it.

With the pool's prefix cache on, a sequence joins holding the cached blocks its prompt
starts with (only fresh blocks for the rest count against the free ones) and its prefill
starts after them; each prompt block its prefill fills is published for later sequences
(:meth:`Scheduler.prefilled`). The last prompt token is always computed, so there are
logits to sample the first token from. A sequence whose next prompt block a prefilling
sequence is computing right now (the n choices of one request, agents joining at once with
one system prompt) waits for it to be published instead of computing it again; later
sequences may pass it meanwhile (the wait ends within that prefill).

Each turn of the engine: :meth:`Scheduler.admit`, one prefill run over
:meth:`Scheduler.plan_prefill` (the next prompt chunks of the oldest prefilling sequences,
right-padded to the widest within ``prefill_tokens``), one decode step over
:attr:`Scheduler.running`; :meth:`Scheduler.update` takes each sequence's new token.
"""

from __future__ import annotations

import contextlib
import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from agentd.errors import InvalidArgument, ResourceExhausted

__all__ = ["BlockPool", "Outcome", "Scheduler", "Sequence"]


class BlockPool(Protocol):
    """The KV cache's blocks as the scheduler sees them (``TokenBlockPool`` is one)."""

    @property
    def free(self) -> int: ...

    @property
    def total(self) -> int: ...

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold ``tokens`` cached tokens."""
        ...

    def borrow(self, count: int) -> list[int] | None:
        """Take ``count`` blocks, or None (taking nothing) when fewer are free."""
        ...

    def give_back(self, blocks: list[int]) -> None: ...

    # The prefix cache (used only when the scheduler's ``prefix_cache`` is on).
    @property
    def block_size(self) -> int: ...

    def prompt_keys(self, prompt: Any) -> list[bytes]:
        """The chained keys of the prompt's full blocks."""
        ...

    def cached_prefix(self, keys: list[bytes]) -> int:
        """How many of ``keys`` (from the prompt's first block) are cached."""
        ...

    def borrow_prefix(self, keys: list[bytes], count: int) -> tuple[list[int], int] | None:
        """``count`` blocks, the cached ones of ``keys`` first: (blocks, cached count)."""
        ...

    def publish(self, block: int, key: bytes) -> bool: ...


class Outcome(enum.Enum):
    """What a new token does to its sequence (:meth:`Scheduler.update`)."""

    CONTINUE = "continue"  # emit it; the sequence decodes on
    LENGTH = "length"  # emit it; the sequence is at max_tokens or the context: finish it
    STOP = "stop"  # an end-of-sequence token: not emitted; finish the sequence


@dataclass(eq=False, slots=True)
class Sequence:
    """One request's place in the engine. ``prompt`` is indexable token ids."""

    prompt: Any
    max_tokens: int
    blocks: list[int] = field(default_factory=list)
    length: int = 0  # tokens in the cache (below len(prompt) while the prompt is prefilled)
    chunk: int = 0  # prompt tokens in the prefill run planned for it
    generated: int = 0
    next_token: int = 0  # the last token generated: the next decode step's input
    cancelled: bool = False
    finished: bool = False
    keys: list[bytes] | None = None  # prefix keys of its full prompt blocks (prefix cache)
    published: int = 0  # its leading blocks already cached (taken from or published to it)


# The engine schedules its own subclass (with a sampler and a consumer) and gets it back.
_S = TypeVar("_S", bound=Sequence)


class Scheduler(Generic[_S]):
    """Admission, prefill planning, decode batches and the end of sequences over ``pool``.

    ``max_batch``: sequences admitted at once (prefilling and running); ``prefill_tokens``:
    padded prompt tokens per prefill run (a longer prompt is prefilled in chunks, so running
    sequences wait one chunk's run at a time); ``max_waiting``: sequences queued for
    admission before :meth:`check` refuses more; ``prefix_cache``: reuse the pool's cached
    prompt blocks (the pool must cache prefixes).
    """

    def __init__(
        self,
        pool: BlockPool,
        *,
        context_length: int,
        eos_token_ids: tuple[int, ...] = (),
        max_batch: int = 64,
        prefill_tokens: int = 256,
        max_waiting: int = 4096,
        prefix_cache: bool = False,
    ) -> None:
        self.pool = pool
        self.prefix_cache = prefix_cache
        # Prompt tokens of admitted sequences, and those of them found in the prefix cache.
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.context_length = context_length
        self.eos = frozenset(eos_token_ids)
        self.max_batch = max_batch
        self.prefill_tokens = prefill_tokens
        self.max_waiting = max_waiting
        self.waiting: deque[_S] = deque()
        self.prefilling: list[_S] = []  # admitted, prompt not all in the cache yet
        self.running: list[_S] = []  # decoding
        self.in_flight: frozenset[_S] = frozenset()

    def has_work(self) -> bool:
        """Whether a step has anything to run (admitted sequences)."""
        return bool(self.prefilling or self.running)

    def check(self, prompt_len: int, max_tokens: int, model: str = "the model") -> None:
        """Raise InvalidArgument when a request can never run here, ResourceExhausted when
        the queue of waiting sequences is full."""
        context = self.context_length
        if prompt_len < 1:
            raise InvalidArgument("the prompt is empty")
        if prompt_len >= context:
            raise InvalidArgument(
                f"the prompt is {prompt_len} tokens; this model's context is {context} tokens"
            )
        need = self.pool.blocks_for(min(prompt_len + max_tokens, context))
        if need > self.pool.total:
            raise InvalidArgument(
                f"prompt + max_tokens needs {need} cache blocks; the pool has {self.pool.total}"
            )
        if len(self.waiting) >= self.max_waiting:
            raise ResourceExhausted(
                f"{len(self.waiting)} sequences are already waiting for {model}"
            )

    def add(self, seq: _S) -> None:
        """Queue ``seq`` for admission (after everything queued before it)."""
        self.waiting.append(seq)

    def admit(self) -> list[_S]:
        """Move waiting sequences in, oldest first, while the batch and the pool have room;
        returns those admitted (each now holds its blocks)."""
        admitted: list[_S] = []
        deferred: list[_S] = []  # waiting for a prefix being computed: back in front after
        waiting, pool = self.waiting, self.pool
        while waiting and len(self.running) + len(self.prefilling) < self.max_batch:
            seq = waiting[0]
            tokens = min(len(seq.prompt) + seq.max_tokens, self.context_length)
            if self.prefix_cache:
                if self._prefix_in_progress(seq):
                    deferred.append(waiting.popleft())
                    continue
                taken = self._borrow_cached(seq, pool.blocks_for(tokens))
                if taken is None:
                    break  # the head waits for blocks; later ones must not overtake it
                blocks, hits = taken
                seq.length = hits * pool.block_size
                seq.published = hits
                self.prefix_queries += len(seq.prompt)
                self.prefix_hits += seq.length
            else:
                borrowed = pool.borrow(pool.blocks_for(tokens))
                if borrowed is None:
                    break  # the head waits for blocks; later ones must not overtake it
                blocks = borrowed
            waiting.popleft()
            seq.blocks = blocks
            self.prefilling.append(seq)
            admitted.append(seq)
        if deferred:
            waiting.extendleft(reversed(deferred))
        return admitted

    def _usable_keys(self, seq: _S) -> list[bytes]:
        """The keys of ``seq``'s prompt blocks it may take from the cache: never the block of
        the last prompt token (computed for its logits, and so written into: a block written
        into is never shared)."""
        if seq.keys is None:
            seq.keys = self.pool.prompt_keys(seq.prompt)
        return seq.keys[: (len(seq.prompt) - 1) // self.pool.block_size]

    def _prefix_in_progress(self, seq: _S) -> bool:
        """Whether a prefilling sequence will publish ``seq``'s first prompt block not
        cached yet (chained keys: the same key is the same prefix)."""
        keys = self._usable_keys(seq)
        cached = self.pool.cached_prefix(keys)
        if cached == len(keys):
            return False
        key = keys[cached]
        # A block another published and still holds is cached: only unpublished ones count.
        return any(
            other.keys is not None
            and len(other.keys) > cached
            and other.keys[cached] == key
            and other.published <= cached
            for other in self.prefilling
        )

    def _borrow_cached(self, seq: _S, count: int) -> tuple[list[int], int] | None:
        return self.pool.borrow_prefix(self._usable_keys(seq), count)

    def prefilled(self, seq: _S) -> None:
        """A prefill run wrote ``seq``'s chunk: cache the prompt blocks it filled."""
        keys = seq.keys
        if keys is None or seq.finished:
            return
        full = min(seq.length // self.pool.block_size, len(keys))
        publish, blocks = self.pool.publish, seq.blocks
        for i in range(seq.published, full):
            publish(blocks[i], keys[i])
        seq.published = max(seq.published, full)

    def plan_prefill(self) -> list[_S]:
        """The sequences for the next prefill run, oldest first, each with its ``chunk``:
        rows right-padded to the widest chunk stay within ``prefill_tokens``. The oldest
        always gets a chunk (of at most ``prefill_tokens``)."""
        planned: list[_S] = []
        width = 0
        budget = self.prefill_tokens
        for seq in self.prefilling:
            chunk = min(len(seq.prompt) - seq.length, budget)
            widest = max(width, chunk)
            if planned and widest * (len(planned) + 1) > budget:
                break
            seq.chunk = chunk
            planned.append(seq)
            width = widest
        return planned

    @staticmethod
    def split(batch: list[_S], lanes: int) -> list[list[_S]]:
        """``batch`` cut into one near-equal run per lane (at most ``lanes`` runs)."""
        if not batch:
            return []
        count = min(lanes, len(batch))
        size, extra = divmod(len(batch), count)
        cuts = [0]
        for lane in range(count):
            cuts.append(cuts[-1] + size + (lane < extra))
        return [batch[cuts[i] : cuts[i + 1]] for i in range(count)]

    def begin_step(self, groups: list[list[_S]]) -> None:
        """The sequences of ``groups`` run now: abandoning one keeps its blocks until
        :meth:`end_step` (the run is writing into them)."""
        self.in_flight = frozenset(seq for group in groups for seq in group)

    def end_step(self) -> None:
        self.in_flight = frozenset()

    def update(self, seq: _S, token: int) -> Outcome:
        """Take the token ``seq`` produced (its prompt is now all in the cache)."""
        if seq.generated == 0:
            self.prefilling.remove(seq)
        if token in self.eos:
            return Outcome.STOP
        seq.generated += 1
        seq.next_token = token
        if seq.generated >= seq.max_tokens or seq.length + 1 > self.context_length:
            return Outcome.LENGTH
        if seq.generated == 1:
            self.running.append(seq)
        return Outcome.CONTINUE

    def abandon(self, seq: _S) -> bool:
        """Its consumer went away. True when ``seq`` ended now (its blocks are back);
        False when it had ended already, or is in the step in flight (then it ends when
        the engine hands that step's results out: it is marked ``cancelled``)."""
        if seq.finished:
            return False
        seq.cancelled = True
        if seq in self.in_flight:
            return False
        with contextlib.suppress(ValueError):
            self.waiting.remove(seq)
        return self.finish(seq)

    def finish(self, seq: _S) -> bool:
        """End ``seq``: its blocks go back to the pool and it leaves every list. False when
        it had ended already."""
        if seq.finished:
            return False
        seq.finished = True
        if seq.blocks:
            self.pool.give_back(seq.blocks)
            seq.blocks = []
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.prefilling:
            self.prefilling.remove(seq)
        return True
