"""Automatic prefix caching: prompt blocks computed once are reused by later sequences
whose prompts start the same way, and nothing a sequence generates changes for it.

Pure unit tests of the block pool and the scheduler, then the built-in tinylm through the
real token engine (cache on against cache off), then a real server's metrics.

The engine tests compare tokens across different batches and prefill chunks, so they run an
fp32 export of tinylm: the served int8 graph quantizes activations per run (dynamic int8),
so its logits depend on what else is in the run, and near-ties flip with or without a
prefix cache.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentd.errors import InvalidArgument
from agentd.generate.config import load_lm_config
from agentd.generate.kv_pool import TokenBlockPool, prefix_keys
from agentd.generate.onnx_lm import engine_for_session, load_onnx_lm, open_session
from agentd.generate.scheduler import Scheduler, Sequence
from agentd.generate.types import SamplingParams
from agentd.inference.repository import builtin_models_dir
from tests.conftest import metric_value

TINYLM = builtin_models_dir() / "tinylm"
TINYLM_HF = Path(__file__).resolve().parents[2] / "models" / "tinylm" / "hf"


def small_pool(blocks: int = 6, block_size: int = 4, prefix_cache: bool = True) -> TokenBlockPool:
    return TokenBlockPool(
        layers=1, blocks=blocks, block_size=block_size, heads=1, head_dim=1,
        prefix_cache=prefix_cache,
    )  # fmt: skip


# -- the pool --------------------------------------------------------------------------


def test_keys_chain_so_equal_keys_mean_equal_prefixes() -> None:
    a = np.arange(12)
    b = a.copy()
    b[1] = 99  # differs in the first block only
    ka, kb = prefix_keys(a, 4, 3), prefix_keys(b, 4, 3)
    assert ka == prefix_keys(a.copy(), 4, 3)
    # Blocks 1 and 2 hold the same tokens, but their prefixes differ: so do their keys.
    assert all(x != y for x, y in zip(ka, kb, strict=True))
    # The same tokens at another position (a shifted block) get another key.
    assert prefix_keys(a[4:8], 4, 1)[0] != ka[1]


def test_cached_blocks_are_shared_by_reference_and_stay_cached_when_released() -> None:
    pool = small_pool()
    keys = prefix_keys(np.arange(8), 4, 2)
    first = pool.borrow(3)
    assert first is not None
    assert pool.publish(first[0], keys[0]) and pool.publish(first[1], keys[1])
    # Same key again (another sequence computed the same prefix at once): stays private.
    assert not pool.publish(first[2], keys[0])
    taken = pool.borrow_prefix(keys, 3)
    assert taken is not None
    blocks, hits = taken
    assert hits == 2 and blocks[:2] == first[:2] and blocks[2] not in first
    assert pool.used == 4  # 3 + 1 fresh: the shared two are counted once
    pool.give_back(first)
    pool.check()
    assert pool.used == 3  # the second sequence still holds the shared two
    pool.give_back(blocks)
    pool.check()
    assert pool.free == pool.total and pool.stats().cached == 2
    with pytest.raises(RuntimeError, match="not borrowed"):
        pool.give_back(blocks[:1])


def test_eviction_takes_never_used_blocks_first_then_the_least_recently_used() -> None:
    pool = small_pool(blocks=4)
    a_keys = prefix_keys(np.arange(8), 4, 2)
    b_keys = prefix_keys(np.arange(100, 104), 4, 1)
    a = pool.borrow(2)
    b = pool.borrow(1)
    assert a is not None and b is not None
    pool.publish(a[0], a_keys[0])
    pool.publish(a[1], a_keys[1])
    pool.publish(b[0], b_keys[0])
    pool.give_back(a)  # a's prefix is released before b's: older
    pool.give_back(b)
    assert pool.free == 4 and pool.stats().cached == 3
    assert pool.borrow(1) is not None  # the never-used block: nothing evicted
    assert pool.cached_prefix(a_keys) == 2
    assert pool.borrow(1) is not None  # evicts a's last block first (useless without its first)
    assert pool.cached_prefix(a_keys) == 1 and pool.cached_prefix(b_keys) == 1
    assert pool.borrow(1) is not None
    assert pool.cached_prefix(a_keys) == 0 and pool.cached_prefix(b_keys) == 1
    assert pool.borrow(2) is None  # one free block left: nothing taken
    assert pool.cached_prefix(b_keys) == 1
    pool.check()


def test_admission_counts_an_idle_cached_block_once() -> None:
    # 4 blocks, 2 of them cached and idle: a sequence reusing both needs 2 fresh ones,
    # and there are only 2 others. It fits; a sequence needing one more does not, and
    # its failed try takes nothing (not even the cached blocks).
    pool = small_pool(blocks=4)
    keys = prefix_keys(np.arange(8), 4, 2)
    held = pool.borrow(2)
    assert held is not None
    for block, key in zip(held, keys, strict=True):
        pool.publish(block, key)
    pool.give_back(held)
    assert pool.borrow_prefix(keys, 5) is None
    assert pool.free == 4
    pool.check()
    taken = pool.borrow_prefix(keys, 4)
    assert taken is not None and taken[1] == 2 and pool.free == 0
    pool.check()


# -- the scheduler ---------------------------------------------------------------------


def admit_one(scheduler: Scheduler, prompt: list[int], max_tokens: int = 4) -> Sequence:
    seq = Sequence(prompt=np.asarray(prompt, dtype=np.int64), max_tokens=max_tokens)
    scheduler.add(seq)
    assert scheduler.admit() == [seq]
    return seq


def test_the_block_of_the_last_prompt_token_is_never_taken_from_the_cache() -> None:
    pool = small_pool(blocks=16)
    scheduler: Scheduler = Scheduler(pool, context_length=64, prefix_cache=True)
    prompt = list(range(2, 10))  # exactly two blocks
    first = admit_one(scheduler, prompt)
    assert first.length == 0
    first.length = len(prompt)  # as if its prefill ran
    scheduler.prefilled(first)
    assert pool.stats().cached == 2
    # The same prompt: its first block comes from the cache; the second holds the last
    # prompt token, which is computed again (for its logits) into a block of its own.
    again = admit_one(scheduler, prompt)
    assert again.length == 4 and again.blocks[0] == first.blocks[0]
    assert again.blocks[1] != first.blocks[1]
    longer = admit_one(scheduler, [*prompt, 42])
    assert longer.length == 8 and longer.blocks[:2] == first.blocks[:2]
    assert (scheduler.prefix_queries, scheduler.prefix_hits) == (8 + 8 + 9, 0 + 4 + 8)
    for seq in (first, again, longer):
        scheduler.finish(seq)
    pool.check()
    assert pool.free == pool.total


def test_a_partly_prefilled_prompt_publishes_only_the_blocks_it_filled() -> None:
    pool = small_pool(blocks=16)
    scheduler: Scheduler = Scheduler(pool, context_length=64, prefix_cache=True)
    seq = admit_one(scheduler, list(range(2, 16)))  # 14 tokens: 3 full blocks
    seq.length = 6  # a first chunk of 6 tokens: one block full
    scheduler.prefilled(seq)
    assert pool.stats().cached == 1
    seq.length = 14
    scheduler.prefilled(seq)
    assert pool.stats().cached == 3


# -- the engine, with the built-in tinylm ----------------------------------------------


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    from agentd.generate.onnx_export import export_onnx

    folder = tmp_path_factory.mktemp("tinylm-fp32")
    return open_session(export_onnx(TINYLM_HF, folder / "model.onnx"), threads=1)


def tiny_engine(session, *, prefix_cache: bool, blocks: int = 128, block_size: int = 16, **kw):
    return engine_for_session(
        session, name="tinylm", eos_token_ids=(), blocks=blocks, block_size=block_size,
        prefix_cache=prefix_cache, **kw,
    )  # fmt: skip


async def collect(engine, prompt: list[int], max_tokens: int = 8) -> list[int]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return [t async for t in engine.stream(prompt, params)]


def random_tokens(count: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(6, 500, size=count).tolist()


async def test_a_second_request_with_the_same_512_token_prefix_computes_none_of_it(session):
    prefix = random_tokens(512, seed=1)
    first, second = prefix + random_tokens(20, seed=2), prefix + random_tokens(25, seed=3)
    cached, plain = (
        tiny_engine(session, prefix_cache=True),
        tiny_engine(session, prefix_cache=False),
    )
    try:
        got_first = await collect(cached, first)
        pool = cached.pool
        allocated, hits = pool.allocated, cached.scheduler.prefix_hits
        got_second = await collect(cached, second)
        # Only the blocks past the prefix are new: its 32 blocks came from the cache.
        assert pool.allocated - allocated == pool.blocks_for(len(second) + 8) - 512 // 16
        assert cached.scheduler.prefix_hits - hits == 512
        assert cached.gauges()["prefix_cache_hits"] == 512
        # Greedy tokens as without the cache.
        assert got_first == await collect(plain, first)
        assert got_second == await collect(plain, second)
        assert plain.scheduler.prefix_hits == 0 and plain.pool.stats().cached == 0
        # The very same prompt: all but the block of its last token from the cache.
        assert await collect(cached, first) == got_first
        pool.check()
        assert pool.used == 0
    finally:
        await cached.close()
        await plain.close()


async def test_cached_blocks_are_evicted_for_new_work_and_recomputed_correctly(session):
    # 12 blocks of 4 tokens: a 40-token prompt and 8 new tokens take all of them, so each
    # new prompt evicts what the one before left cached.
    cached = tiny_engine(session, prefix_cache=True, blocks=12, block_size=4)
    plain = tiny_engine(session, prefix_cache=False, blocks=12, block_size=4)
    a, b = random_tokens(40, seed=4), random_tokens(40, seed=5)
    try:
        for prompt in (a, b, a, b[:30] + a[:10]):
            assert await collect(cached, prompt) == await collect(plain, prompt)
        assert cached.pool.allocated > cached.pool.total  # blocks were evicted and reused
        cached.pool.check()
    finally:
        await cached.close()
        await plain.close()


async def test_abandoning_a_sequence_releases_its_references(session):
    engine = tiny_engine(session, prefix_cache=True, blocks=64, block_size=4)
    prompt = random_tokens(40, seed=6)
    try:
        await collect(engine, prompt)
        pool = engine.pool
        cached = pool.stats().cached
        # Two sequences hold the cached prefix at once; both leave mid-stream.
        params = SamplingParams(max_tokens=50, temperature=0.0)
        streams = [engine.stream([*prompt, 7, i], params) for i in (8, 9)]
        for stream in streams:
            await anext(stream)
        assert pool.used > 0
        for stream in streams:
            await stream.aclose()
        # One more leaves before its first token (while it waits or is prefilled).
        leaving = engine.stream([*prompt, 7, 10], params)
        first = asyncio.ensure_future(anext(leaving))
        await asyncio.sleep(0)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await leaving.aclose()
        for _ in range(200):
            if pool.used == 0:
                break
            await asyncio.sleep(0.005)
        pool.check()
        assert pool.used == 0 and pool.free == pool.total
        assert pool.stats().cached >= cached  # released, still cached
        # Each of the two took the 10 blocks before the one of its last prompt token.
        assert engine.scheduler.prefix_hits >= 2 * 40
    finally:
        await engine.close()


_SOLO: dict[tuple[int, ...], list[int]] = {}


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    plan=st.lists(
        st.tuples(
            st.integers(0, 2),  # which shared prefix
            st.integers(0, 28),  # how much of it
            st.integers(0, 8),  # own tokens after it
            st.integers(1, 6),  # max_tokens
            st.integers(0, 3),  # event-loop turns before it joins
        ),
        min_size=1,
        max_size=6,
    ),
    lanes=st.integers(1, 2),
    prefill_tokens=st.sampled_from([5, 64]),
)
def test_any_mix_under_pool_pressure_gets_its_solo_cache_off_tokens(
    session, plan, lanes, prefill_tokens
):
    bases = [random_tokens(28, seed=10 + i) for i in range(3)]

    async def scenario() -> None:
        plain = tiny_engine(session, prefix_cache=False, blocks=12, block_size=4)
        engine = tiny_engine(
            session, prefix_cache=True, blocks=12, block_size=4, max_batch=3, lanes=lanes
        )
        engine.prefill_tokens = prefill_tokens
        requests = []
        for i, (base, length, own, max_tokens, delay) in enumerate(plan):
            prompt = bases[base][:length] + random_tokens(own, seed=100 + i)
            requests.append((prompt or [6], max_tokens, delay))

        async def client(prompt: list[int], max_tokens: int, delay: int) -> list[int]:
            for _ in range(delay):
                await asyncio.sleep(0)
            return await collect(engine, prompt, max_tokens)

        try:
            for prompt, max_tokens, _ in requests:
                key = (*prompt, -max_tokens)
                if key not in _SOLO:
                    _SOLO[key] = await collect(plain, prompt, max_tokens)
            got = await asyncio.wait_for(asyncio.gather(*(client(*r) for r in requests)), 60)
            for (prompt, max_tokens, _), tokens in zip(requests, got, strict=True):
                assert tokens == _SOLO[(*prompt, -max_tokens)]
            engine.pool.check()
            assert engine.pool.used == 0
        finally:
            await engine.close()
            await plain.close()

    asyncio.run(scenario())


# -- the setting and the metrics -------------------------------------------------------


@pytest.fixture
def tinylm_folder(tmp_path):
    folder = tmp_path / "tinylm"
    shutil.copytree(TINYLM, folder)
    return folder


def set_kv_cache(folder, **cache) -> None:
    path = folder / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config["kv_cache"] = {"block_size": 16, "blocks": 8} | cache
    path.write_text(yaml.safe_dump(config))


async def test_prefix_cache_false_in_the_config_turns_it_off(tinylm_folder):
    set_kv_cache(tinylm_folder)
    assert load_lm_config(tinylm_folder).prefix_cache is True
    set_kv_cache(tinylm_folder, prefix_cache=False)
    engine = load_onnx_lm(load_lm_config(tinylm_folder), threads=1)
    try:
        prompt = random_tokens(40, seed=7)
        await collect(engine, prompt, 4)
        await collect(engine, prompt, 4)
        assert engine.scheduler.prefix_hits == 0
        assert engine.pool.stats().cached == 0
        assert engine.pool.allocated == 2 * engine.pool.blocks_for(44)
    finally:
        await engine.close()


@pytest.mark.parametrize("value", ["sometimes", 2, None])
def test_a_bad_prefix_cache_setting_is_refused_naming_it(tinylm_folder, value):
    set_kv_cache(tinylm_folder, prefix_cache=value)
    with pytest.raises(InvalidArgument, match="prefix_cache"):
        load_lm_config(tinylm_folder)


def test_the_server_counts_prefix_cache_queries_and_hits(http):
    def counters() -> tuple[float, float]:
        text = http.get("/metrics").text
        return (
            metric_value(text, "agentd_generate_prefix_cache_queries_total", model="tinylm"),
            metric_value(text, "agentd_generate_prefix_cache_hits_total", model="tinylm"),
        )

    system = "You are a careful assistant who counts colours and animals. " * 12
    before = counters()
    for question in ("what colour is the sky?", "count from 1 to 3"):
        response = http.post(
            "/v1/chat/completions",
            json={
                "model": "tinylm",
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": question},
                ],
                "max_tokens": 4,
                "temperature": 0,
            },
        )
        assert response.status_code == 200, response.text
    queries, hits = counters()
    prompt_tokens = response.json()["usage"]["prompt_tokens"]
    assert prompt_tokens > 100
    assert queries - before[0] >= 2 * prompt_tokens - 20
    # The second request found the shared system prompt's blocks (16 tokens each) cached.
    assert hits - before[1] >= 64


async def test_a_failed_prefill_run_caches_nothing(session):
    from agentd.errors import Internal

    cached = tiny_engine(session, prefix_cache=True, blocks=64, block_size=4)
    plain = tiny_engine(session, prefix_cache=False, blocks=64, block_size=4)
    prompt = random_tokens(40, seed=8)
    try:
        # The run fails on the token past the vocabulary: the blocks it was to fill hold
        # nothing computed, so none may be found by the next prompt with the same start.
        with pytest.raises(Internal):
            await collect(cached, [*prompt, 10_000_000])
        assert cached.pool.stats().cached == 0
        assert await collect(cached, [*prompt, 7]) == await collect(plain, [*prompt, 7])
        cached.pool.check()
    finally:
        await cached.close()
        await plain.close()


def test_a_prompt_being_prefilled_is_waited_for_not_computed_twice() -> None:
    pool = small_pool(blocks=32)
    scheduler: Scheduler = Scheduler(pool, context_length=64, prefix_cache=True)
    prompt = np.arange(2, 15)  # 13 tokens: 3 blocks may be shared
    same = [Sequence(prompt=prompt, max_tokens=2) for _ in range(3)]
    other = Sequence(prompt=np.arange(40, 50), max_tokens=2)
    for seq in (*same, other):
        scheduler.add(seq)
    # The first computes the prompt; the two like it wait, and the other one passes them.
    assert scheduler.admit() == [same[0], other]
    assert list(scheduler.waiting) == same[1:]
    assert scheduler.admit() == []
    same[0].length = 8  # a first chunk: two blocks in the cache
    scheduler.prefilled(same[0])
    assert scheduler.admit() == []  # its third block is still to come
    same[0].length = 13
    scheduler.prefilled(same[0])
    assert scheduler.admit() == same[1:]
    assert [seq.length for seq in same[1:]] == [12, 12]
    assert all(seq.blocks[:3] == same[0].blocks[:3] for seq in same[1:])
    # A sequence computing the prefix that leaves does not hold the others up.
    waiter = Sequence(prompt=np.arange(60, 73), max_tokens=2)
    first = Sequence(prompt=np.arange(60, 73), max_tokens=2)
    scheduler.add(first)
    scheduler.add(waiter)
    assert scheduler.admit() == [first]
    scheduler.abandon(first)
    assert scheduler.admit() == [waiter] and waiter.length == 0


async def test_n_identical_prompts_at_once_compute_the_prompt_once(session):
    cached = tiny_engine(session, prefix_cache=True, blocks=128, block_size=16)
    plain = tiny_engine(session, prefix_cache=False, blocks=128, block_size=16)
    prompt = random_tokens(200, seed=9)
    try:
        got = await asyncio.gather(*(collect(cached, prompt) for _ in range(4)))
        assert got == [await collect(plain, prompt)] * 4
        # The three later ones took the 12 blocks before the one of the last token.
        assert cached.scheduler.prefix_hits == 3 * 12 * 16
        assert cached.pool.allocated == cached.pool.blocks_for(208) + 3 * 1
    finally:
        await cached.close()
        await plain.close()
