"""The token engine's scheduler against a fake block pool: no model, no threads, no loop.

Scenarios as vLLM tests its scheduler: admission when blocks run out, finishing and
cancellation free blocks, first come first served, prefill chunking and decode batches.
"""

from __future__ import annotations

import pytest

from agentd.errors import InvalidArgument, ResourceExhausted
from agentd.generate.scheduler import Outcome, Scheduler, Sequence

EOS = 1


class FakeBlockPool:
    """Block bookkeeping only: ids on a free list, no cache memory."""

    def __init__(self, blocks: int, block_size: int = 4) -> None:
        self.total, self.block_size = blocks, block_size
        self._free = list(range(blocks))
        self.borrowed: set[int] = set()

    @property
    def free(self) -> int:
        return len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return max(1, -(-tokens // self.block_size))

    def borrow(self, count: int) -> list[int] | None:
        if count > len(self._free):
            return None
        taken, self._free = self._free[:count], self._free[count:]
        self.borrowed.update(taken)
        return taken

    def give_back(self, blocks: list[int]) -> None:
        assert set(blocks) <= self.borrowed, "returned blocks that were not borrowed"
        self.borrowed.difference_update(blocks)
        self._free.extend(blocks)


def make(pool: FakeBlockPool, **kwargs) -> Scheduler:
    options = {"context_length": 64, "eos_token_ids": (EOS,), "max_batch": 8}
    return Scheduler(pool, **{**options, **kwargs})


def seq(prompt_len: int, max_tokens: int) -> Sequence:
    return Sequence(prompt=list(range(10, 10 + prompt_len)), max_tokens=max_tokens)


def prefill_all(scheduler: Scheduler, token: int = 7) -> list[Sequence]:
    """Run prefill until every admitted prompt is in the cache, as the runner would."""
    done = []
    while planned := scheduler.plan_prefill():
        for s in planned:
            s.length += s.chunk
            if s.length == len(s.prompt):
                assert scheduler.update(s, token) is Outcome.CONTINUE
                done.append(s)
    return done


def decode(scheduler: Scheduler, token: int = 7) -> dict[Sequence, Outcome]:
    outcomes = {}
    for s in list(scheduler.running):
        s.length += 1
        outcomes[s] = scheduler.update(s, token)
        if outcomes[s] is not Outcome.CONTINUE:
            scheduler.finish(s)
    return outcomes


def test_admission_stops_when_blocks_run_out_and_the_head_is_not_overtaken() -> None:
    pool = FakeBlockPool(blocks=6)
    scheduler = make(pool)
    big, small, tiny = seq(8, 8), seq(8, 8), seq(2, 2)  # 4, 4 and 1 blocks
    for s in (big, small, tiny):
        scheduler.add(s)
    assert scheduler.admit() == [big]
    assert pool.free == 2
    # tiny would fit, but small is first in line: it waits, and so does everyone behind it.
    assert list(scheduler.waiting) == [small, tiny]
    assert scheduler.admit() == []
    scheduler.finish(big)
    assert pool.free == 6
    assert scheduler.admit() == [small, tiny]
    assert pool.free == 1


def test_admission_reserves_prompt_plus_max_tokens_within_the_context() -> None:
    pool = FakeBlockPool(blocks=100)
    scheduler = make(pool, context_length=16)
    long = seq(10, 1000)  # capped at the context: 16 tokens, 4 blocks
    scheduler.add(long)
    scheduler.admit()
    assert len(long.blocks) == 4


def test_the_batch_limit_holds_sequences_back() -> None:
    pool = FakeBlockPool(blocks=100)
    scheduler = make(pool, max_batch=2)
    seqs = [seq(2, 2) for _ in range(3)]
    for s in seqs:
        scheduler.add(s)
    assert scheduler.admit() == seqs[:2]
    assert list(scheduler.waiting) == seqs[2:]


def test_finishing_frees_blocks_at_length_and_at_end_of_sequence() -> None:
    pool = FakeBlockPool(blocks=20)
    scheduler = make(pool)
    short, stopper = seq(3, 2), seq(3, 10)
    scheduler.add(short)
    scheduler.add(stopper)
    scheduler.admit()
    assert set(prefill_all(scheduler)) == {short, stopper}
    assert scheduler.running == [short, stopper]
    short.length += 1
    assert scheduler.update(short, 7) is Outcome.LENGTH  # its second token: max_tokens
    assert scheduler.finish(short)
    stopper.length += 1
    assert scheduler.update(stopper, EOS) is Outcome.STOP
    assert stopper.generated == 1  # the end-of-sequence token is not a generated token
    assert scheduler.finish(stopper)
    assert not scheduler.finish(stopper)  # once only
    assert pool.free == 20 and not pool.borrowed
    assert not scheduler.has_work()


def test_a_sequence_ends_at_the_context() -> None:
    pool = FakeBlockPool(blocks=20)
    scheduler = make(pool, context_length=8)
    s = seq(6, 100)
    scheduler.add(s)
    scheduler.admit()
    prefill_all(scheduler)  # 6 tokens cached, the first generated
    assert decode(scheduler) == {s: Outcome.CONTINUE}  # 7 cached
    # 8 cached: the context is full, so the token this step made is the last.
    assert decode(scheduler) == {s: Outcome.LENGTH}
    assert s.generated == 3 and pool.free == 20


def test_cancellation_while_waiting_prefilling_or_running_frees_blocks_at_once() -> None:
    pool = FakeBlockPool(blocks=4)
    scheduler = make(pool)
    running, prefilling, waiting = seq(2, 2), seq(4, 4), seq(8, 8)
    scheduler.add(running)
    scheduler.admit()
    prefill_all(scheduler)
    for s in (prefilling, waiting):
        scheduler.add(s)
    scheduler.admit()
    assert scheduler.prefilling == [prefilling] and list(scheduler.waiting) == [waiting]
    for s in (waiting, prefilling, running):
        assert scheduler.abandon(s)
        assert s.cancelled and s.finished
    assert pool.free == 4 and not scheduler.waiting and not scheduler.has_work()
    assert not scheduler.abandon(running)  # ended already


def test_cancellation_mid_step_keeps_blocks_until_the_step_ends() -> None:
    pool = FakeBlockPool(blocks=10)
    scheduler = make(pool, max_batch=4)
    a, b = seq(2, 8), seq(2, 8)
    scheduler.add(a)
    scheduler.add(b)
    scheduler.admit()
    prefill_all(scheduler)
    scheduler.begin_step(scheduler.split(scheduler.running, 2))
    # a's consumer goes away while the run writes into a's blocks: they stay lent.
    assert not scheduler.abandon(a)
    assert a.cancelled and not a.finished and pool.free == 4
    scheduler.end_step()
    # The engine hands the step's results out: a cancelled sequence is finished then.
    assert scheduler.finish(a)
    assert pool.free == 7 and scheduler.running == [b]


def test_first_come_first_served_into_prefill_and_decode() -> None:
    pool = FakeBlockPool(blocks=100)
    scheduler = make(pool, prefill_tokens=8)
    seqs = [seq(4, 4) for _ in range(3)]
    for s in seqs:
        scheduler.add(s)
    assert scheduler.admit() == seqs
    # Two 4-token rows fit 8 padded tokens; the third goes in the next run.
    assert scheduler.plan_prefill() == seqs[:2]
    for s in seqs[:2]:
        s.length += s.chunk
        scheduler.update(s, 7)
    assert scheduler.plan_prefill() == seqs[2:]
    assert scheduler.running == seqs[:2]


def test_a_long_prompt_is_prefilled_in_chunks_and_the_oldest_always_gets_one() -> None:
    pool = FakeBlockPool(blocks=100)
    scheduler = make(pool, context_length=64, prefill_tokens=8)
    long, short = seq(20, 2), seq(3, 2)
    scheduler.add(long)
    scheduler.add(short)
    scheduler.admit()
    chunks = []
    while planned := scheduler.plan_prefill():
        chunks.append([(s is long, s.chunk) for s in planned])
        for s in planned:
            s.length += s.chunk
            if s.length == len(s.prompt):
                scheduler.update(s, 7)
    # The oldest gets a full chunk each run; the short one waits until it fits beside it.
    assert chunks == [[(True, 8)], [(True, 8)], [(True, 4), (False, 3)]]


def test_split_cuts_a_batch_into_near_equal_lanes_in_order() -> None:
    batch = [seq(1, 1) for _ in range(5)]
    groups = Scheduler.split(batch, 2)
    assert [len(g) for g in groups] == [3, 2]
    assert [s for g in groups for s in g] == batch
    assert Scheduler.split(batch[:1], 4) == [batch[:1]]
    assert Scheduler.split([], 4) == []


def test_check_refuses_what_can_never_run_and_a_full_queue() -> None:
    pool = FakeBlockPool(blocks=4, block_size=4)
    scheduler = make(pool, context_length=64, max_waiting=1)
    with pytest.raises(InvalidArgument, match="empty"):
        scheduler.check(0, 4)
    with pytest.raises(InvalidArgument, match="context is 64"):
        scheduler.check(64, 4)
    with pytest.raises(InvalidArgument, match="needs 5 cache blocks"):
        scheduler.check(10, 10)
    scheduler.check(4, 4)
    scheduler.add(seq(4, 4))
    with pytest.raises(ResourceExhausted, match="1 sequences are already waiting"):
        scheduler.check(4, 4, "'m'")


def test_the_scheduler_imports_no_runtime_library() -> None:
    import subprocess
    import sys

    code = (
        "import sys, agentd.generate.scheduler; "
        "print(sorted(m for m in ('onnxruntime', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
