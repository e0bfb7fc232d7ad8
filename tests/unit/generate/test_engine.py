"""The token engine over a small random model: continuous batching must not change what a
sequence generates, the block pool must always balance, and bad requests fail up front."""

import asyncio

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentd.errors import InvalidArgument
from agentd.generate.types import SamplingParams
from agentd.testing.lm import build_engine, dense_greedy

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


async def collect(engine, prompt, params=GREEDY):
    return [t async for t in engine.stream(prompt, params)]


def prompts(count, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, 64, size=int(rng.integers(1, 40))).tolist() for _ in range(count)]


async def solo_results(random_lm, items, params=GREEDY):
    engine = build_engine(random_lm, blocks=64, block_size=4, eos=())
    try:
        return [await collect(engine, p, params) for p in items]
    finally:
        await engine.close()


async def test_batched_greedy_equals_one_at_a_time(random_lm):
    items = prompts(8)
    alone = await solo_results(random_lm, items)
    engine = build_engine(random_lm, blocks=64, block_size=4, eos=())
    try:
        together = await asyncio.gather(*(collect(engine, p) for p in items))
        assert together == alone
        assert all(len(tokens) == GREEDY.max_tokens for tokens in together)
        # Eight sequences of twelve tokens in far fewer model runs than 8 * 12.
        assert engine.steps < 8 * GREEDY.max_tokens
        assert engine.pool.free == engine.pool.total
        engine.pool.check()
    finally:
        await engine.close()


async def test_lanes_split_each_step_without_changing_any_sequence(random_lm):
    items = prompts(7, seed=6)
    alone = await solo_results(random_lm, items)
    engine = build_engine(random_lm, blocks=64, block_size=4, eos=(), lanes=3)
    engine.prefill_tokens = 10_000  # all seven prompts in one prefill step
    try:
        together = await asyncio.gather(*(collect(engine, p) for p in items))
        assert together == alone
        # The prefill and each of the 11 decode steps in three runs, one per lane.
        assert engine.steps == 3 * GREEDY.max_tokens
        assert engine.pool.free == engine.pool.total
    finally:
        await engine.close()


async def test_a_failing_run_in_one_lane_leaves_the_other_lanes_going(random_lm):
    from agentd.errors import Internal

    engine = build_engine(random_lm, blocks=16, block_size=4, eos=(), lanes=2)
    try:  # both prompts in one prefill step, one lane each
        good, bad = await asyncio.gather(
            collect(engine, [3, 4]), collect(engine, [3, 10_000]), return_exceptions=True
        )
        assert isinstance(bad, Internal)
        assert len(good) == GREEDY.max_tokens
        assert engine.pool.free == engine.pool.total
    finally:
        await engine.close()


async def test_joined_prompts_share_prefill_runs_within_the_token_budget(random_lm):
    items = prompts(6, seed=4)  # 1 to 39 tokens each, right-padded to the longest in a run
    first_only = SamplingParams(max_tokens=1, temperature=0.0)
    alone = await solo_results(random_lm, items, first_only)
    prompt_tokens = sum(len(p) for p in items)
    # All in one run; or one token of one prompt per run (the oldest first), so every
    # prompt goes into the cache in chunks of one token.
    for budget, runs in ((10_000, 1), (1, prompt_tokens)):
        engine = build_engine(random_lm, blocks=64, block_size=4, eos=())
        engine.prefill_tokens = budget
        try:
            together = await asyncio.gather(*(collect(engine, p, first_only) for p in items))
            assert together == alone
            assert engine.steps == runs  # one token each: prefill runs only
            assert engine.pool.free == engine.pool.total
        finally:
            await engine.close()


async def test_a_long_prompt_is_prefilled_between_decode_steps(random_lm, random_lm_dense):
    engine = build_engine(random_lm, blocks=64, block_size=4, eos=())
    engine.prefill_tokens = 8
    params = SamplingParams(max_tokens=40, temperature=0.0)
    short, long = [3, 4, 5], list(range(2, 62))  # the long one needs 8 prefill runs
    try:
        running = engine.stream(short, params)
        got_short = [await anext(running)]  # decoding now
        long_stream = engine.stream(long, GREEDY)
        long_first = asyncio.ensure_future(anext(long_stream))
        while not long_first.done():
            got_short.append(await anext(running))
        # The short stream kept getting tokens while the long prompt went in chunk by chunk
        # (one decode step after each of the first seven chunks); all at once, it would
        # have waited for the whole prefill.
        assert len(got_short) - 1 >= 7
        got_long = [long_first.result()] + [token async for token in long_stream]
        got_short += [token async for token in running]
        assert got_short == dense_greedy(random_lm_dense, short, 40)[0]
        assert got_long == dense_greedy(random_lm_dense, long, GREEDY.max_tokens)[0]
        assert engine.pool.free == engine.pool.total
    finally:
        await engine.close()


async def test_seeded_sampling_is_reproducible_in_any_batch(random_lm):
    params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, top_k=20, seed=7)
    items = prompts(4, seed=3)
    alone = await solo_results(random_lm, items, params)
    engine = build_engine(random_lm, blocks=64, block_size=4, eos=())
    try:
        together = await asyncio.gather(*(collect(engine, p, params) for p in items))
    finally:
        await engine.close()
    assert together == alone
    unseeded = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, top_k=20, seed=8)
    assert await solo_results(random_lm, items[:1], unseeded) != alone[:1]


async def test_eos_ends_a_sequence_without_emitting_it(random_lm):
    prompt = prompts(1, seed=5)[0]
    (free_run,) = await solo_results(random_lm, [prompt])
    eos = free_run[3]
    engine = build_engine(random_lm, blocks=16, block_size=4, eos=(eos,))
    try:
        tokens = await collect(engine, prompt)
    finally:
        await engine.close()
    assert tokens == free_run[: free_run.index(eos)]


async def test_pool_exhaustion_queues_sequences_and_all_finish(random_lm):
    # Each sequence needs ceil((len + 12) / 4) blocks; 12 blocks fit one or two at a time.
    engine = build_engine(random_lm, blocks=12, block_size=4, eos=())
    items = [p[:20] for p in prompts(6, seed=9)]
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(collect(engine, p) for p in items)), timeout=60
        )
        assert results == await solo_results(random_lm, items)
        stats = engine.pool.stats()
        assert stats.peak_used <= stats.total and stats.free == stats.total
    finally:
        await engine.close()


async def test_closing_a_stream_returns_its_blocks(random_lm):
    engine = build_engine(random_lm, blocks=32, block_size=4, eos=())
    try:
        stream = engine.stream(prompts(1)[0], SamplingParams(max_tokens=60, temperature=0))
        got = []
        async for token in stream:
            got.append(token)
            if len(got) == 3:
                break
        await stream.aclose()
        for _ in range(200):  # at most the step in flight
            if engine.pool.free == engine.pool.total:
                break
            await asyncio.sleep(0.005)
        assert engine.pool.free == engine.pool.total
        assert engine.gauges()["active"] == 0
    finally:
        await engine.close()


async def test_requests_that_can_never_run_fail_up_front(random_lm):
    engine = build_engine(random_lm, blocks=8, block_size=4, eos=())
    try:
        with pytest.raises(InvalidArgument, match="empty"):
            engine.stream([], GREEDY)
        with pytest.raises(InvalidArgument, match="context"):
            engine.stream([3] * 256, GREEDY)
        with pytest.raises(InvalidArgument, match="cache blocks"):
            engine.stream([3] * 30, SamplingParams(max_tokens=10))
    finally:
        await engine.close()


@st.composite
def plans(draw):
    count = draw(st.integers(1, 7))
    return [
        (
            draw(st.integers(1, 24)),  # prompt length
            draw(st.integers(1, 10)),  # max_tokens
            draw(st.one_of(st.none(), st.integers(0, 8))),  # stop reading after n tokens
            draw(st.integers(0, 3)),  # event-loop ticks before joining
        )
        for _ in range(count)
    ]


_REFERENCE: dict[tuple[str, int], list[int]] = {}  # (model, prompt length) -> 10 tokens


def reference(random_lm_dense, length):
    key = (str(random_lm_dense), length)
    if key not in _REFERENCE:
        prompt = list(range(2, 2 + length))
        _REFERENCE[key] = dense_greedy(random_lm_dense, prompt, 10)[0]
    return _REFERENCE[key]


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    plan=plans(),
    eos=st.sampled_from([(), (7,), (3, 11)]),
    lanes=st.integers(1, 3),
    prefill_tokens=st.sampled_from([3, 8, 512]),  # small ones prefill prompts in chunks
)
def test_any_interleaving_leaves_the_pool_consistent(
    random_lm, random_lm_dense, plan, eos, lanes, prefill_tokens
):
    async def scenario():
        engine = build_engine(random_lm, blocks=10, block_size=4, max_batch=3, eos=eos, lanes=lanes)
        engine.prefill_tokens = prefill_tokens

        async def client(length, max_tokens, stop_after, delay):
            for _ in range(delay):
                await asyncio.sleep(0)
            params = SamplingParams(max_tokens=max_tokens, temperature=0)
            stream = engine.stream(list(range(2, 2 + length)), params)
            got = []
            async for token in stream:
                got.append(token)
                if stop_after is not None and len(got) >= stop_after:
                    break
            await stream.aclose()
            return got

        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(client(*p) for p in plan)), timeout=60
            )
            for _ in range(200):
                if engine.pool.free == engine.pool.total:
                    break
                await asyncio.sleep(0.005)
            engine.pool.check()
            assert engine.pool.free == engine.pool.total
            assert engine.gauges() == {
                "active": 0,
                "waiting": 0,
                "blocks_free": 10,
                "blocks_used": 0,
                "tokens_generated": engine.tokens_generated,
                "prefix_cache_queries": engine.scheduler.prefix_queries,
                "prefix_cache_hits": engine.scheduler.prefix_hits,
            }
            # Every token a client got was counted (a client that stopped early may leave
            # some it did not read).
            assert engine.tokens_generated >= sum(len(got) for got in results)
            for (length, max_tokens, stop_after, _), got in zip(plan, results, strict=True):
                assert len(got) <= max_tokens
                if stop_after is not None:
                    assert len(got) <= max(stop_after, 1)
                assert not set(got) & set(eos)
                # Whatever ran beside it, in whichever lane: the tokens a sequence gets are
                # its own greedy continuation, up to an end token or max_tokens.
                expected = reference(random_lm_dense, length)[:max_tokens]
                ends = [i for i, token in enumerate(expected) if token in eos]
                expected = expected[: ends[0]] if ends else expected
                assert got == expected[: len(got)]
                if stop_after is None:
                    assert got == expected
        finally:
            await engine.close()

    asyncio.run(scenario())


async def test_paged_engine_matches_the_dense_reference(random_lm, random_lm_dense):
    items = prompts(3, seed=11)
    engine = build_engine(random_lm, blocks=64, block_size=4, eos=())
    try:
        got = await asyncio.gather(*(collect(engine, p) for p in items))
    finally:
        await engine.close()
    assert got == [dense_greedy(random_lm_dense, p, GREEDY.max_tokens)[0] for p in items]


async def test_a_failing_model_run_fails_its_streams_and_the_engine_goes_on(random_lm):
    from agentd.errors import Internal

    engine = build_engine(random_lm, blocks=16, block_size=4, eos=())
    try:
        # Out-of-vocabulary ids make the embedding Gather fail inside onnxruntime.
        with pytest.raises(Internal, match="failed"):
            await asyncio.wait_for(collect(engine, [3, 10_000]), timeout=30)
        assert engine.pool.free == engine.pool.total
        assert len(await collect(engine, [3, 4])) == GREEDY.max_tokens
    finally:
        await engine.close()


async def test_a_full_waiting_queue_refuses_new_sequences(random_lm):
    from agentd.errors import ResourceExhausted

    engine = build_engine(random_lm, blocks=4, block_size=4, max_batch=1, eos=())
    engine.max_waiting = 2
    params = SamplingParams(max_tokens=4, temperature=0)
    try:
        first = [engine.stream([3, 4], params) for _ in range(2)]
        started = [asyncio.ensure_future(anext(s)) for s in first]
        await asyncio.sleep(0)  # both are queued now
        with pytest.raises(ResourceExhausted, match="waiting"):
            engine.stream([3, 4], params)
        await asyncio.gather(*started)
        for stream in first:
            await stream.aclose()
    finally:
        await engine.close()


async def test_a_client_leaving_before_its_prefill_costs_no_model_run(random_lm, caplog):
    engine = build_engine(random_lm, blocks=32, block_size=4, eos=())
    engine.prefill_tokens = 3  # one three-token prompt per prefill run
    params = SamplingParams(max_tokens=4, temperature=0)
    try:
        streams = [engine.stream([3, 4, 5], params) for _ in range(3)]
        firsts = [asyncio.ensure_future(anext(s)) for s in streams]
        await asyncio.sleep(0)  # all three joined; the first prefill runs
        firsts[2].cancel()
        await asyncio.gather(*firsts[:2])
        steps_before = engine.steps
        for stream in streams[:2]:
            assert len([t async for t in stream]) == 3
        await streams[2].aclose()
        assert engine.pool.free == engine.pool.total
        assert "failed" not in caplog.text
        assert engine.steps - steps_before <= 3  # decode steps only, no third prefill
    finally:
        await engine.close()
