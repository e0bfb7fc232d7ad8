"""The dynamic batcher, with a numpy function as the model (no runtime library needed)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentd.errors import Internal, ResourceExhausted, Unavailable
from agentd.inference import BatchingConfig, DynamicBatcher


class Model:
    """Doubles its input; records the batch sizes it ran; can be held to let a queue fill."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, inputs):
        self.gate.wait(10)
        x = inputs["x"]
        self.batches.append(x.shape[0])
        return {"y": x * 2, "rows": np.arange(x.shape[0])}


@pytest.fixture
def pool():
    with ThreadPoolExecutor(2) as executor:
        yield executor


def batcher(model, pool, **config) -> DynamicBatcher:
    settings = {"max_batch_size": 64, "max_queue_delay_us": 2000, "max_queue_size": 1000}
    return DynamicBatcher("m", model, BatchingConfig(**{**settings, **config}), pool)


async def test_concurrent_callers_share_runs_and_get_their_own_rows(pool):
    model = Model()
    b = batcher(model, pool)
    inputs = [np.full((1, 3), i, np.float32) for i in range(50)]
    results = await asyncio.gather(*(b.submit({"x": x}, 1) for x in inputs))
    await b.aclose()
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result["y"], np.full((1, 3), 2 * i, np.float32))
    assert b.stats.runs < 50
    assert sum(model.batches) == 50
    assert max(model.batches) <= 64


async def test_batch_never_exceeds_max_rows(pool):
    model = Model()
    b = batcher(model, pool, max_batch_size=8)
    await asyncio.gather(*(b.submit({"x": np.ones((3, 2))}, 3) for _ in range(10)))
    await b.aclose()
    assert max(model.batches) <= 8
    assert sum(model.batches) == 30


async def test_cancelled_caller_rows_are_not_run(pool):
    model = Model()
    model.gate.clear()  # the first batch blocks; later callers queue behind it
    b = batcher(model, pool, max_queue_delay_us=0)
    first = asyncio.ensure_future(b.submit({"x": np.zeros((1, 1))}, 1))
    await asyncio.sleep(0.05)
    doomed = [asyncio.ensure_future(b.submit({"x": np.ones((5, 1))}, 5)) for _ in range(3)]
    kept = asyncio.ensure_future(b.submit({"x": np.full((2, 1), 7.0)}, 2))
    await asyncio.sleep(0.01)
    for task in doomed:
        task.cancel()
    model.gate.set()
    await first
    result = await kept
    await b.aclose()
    np.testing.assert_array_equal(result["y"], np.full((2, 1), 14.0))
    assert sum(model.batches) == 3  # 1 + 2 rows: the cancelled 15 rows never ran
    assert b.stats.dropped_cancelled == 3


async def test_a_caller_whose_deadline_passes_in_the_queue_hears_then_and_never_runs(pool):
    # A caller's deadline is a timeout scope around its await: at the deadline the scope
    # cancels the future, which drops the queued rows (they never reach the model).
    model = Model()
    model.gate.clear()
    b = batcher(model, pool, max_queue_delay_us=0)
    running = asyncio.ensure_future(b.submit({"x": np.zeros((1, 1))}, 1))
    await asyncio.sleep(0.05)  # running, blocked in the model
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await b.submit({"x": np.ones((4, 1))}, 4)
    assert time.monotonic() - started < 0.8  # at its deadline, not when the model frees
    model.gate.set()
    await running
    await b.aclose()
    assert model.batches == [1]
    assert b.stats.dropped_cancelled == 1


async def test_full_queue_rejects(pool):
    model = Model()
    model.gate.clear()
    b = batcher(model, pool, max_queue_size=4, max_queue_delay_us=0)
    running = asyncio.ensure_future(b.submit({"x": np.zeros((1, 1))}, 1))
    await asyncio.sleep(0.05)  # that one is running; the queue is empty again
    queued = [asyncio.ensure_future(b.submit({"x": np.zeros((1, 1))}, 1)) for _ in range(4)]
    await asyncio.sleep(0)
    with pytest.raises(ResourceExhausted):
        await b.submit({"x": np.zeros((1, 1))}, 1)
    model.gate.set()
    await asyncio.gather(running, *queued)
    await b.aclose()
    assert b.stats.rejected == 1


async def test_model_failure_reaches_every_caller(pool):
    def broken(inputs):
        raise Internal("boom")

    b = batcher(broken, pool)
    results = await asyncio.gather(
        *(b.submit({"x": np.zeros((1, 1))}, 1) for _ in range(5)), return_exceptions=True
    )
    await b.aclose()
    assert all(isinstance(r, Internal) for r in results)


async def _held_batch(model, b):
    """One caller whose batch is running (held in the model), and two queued behind it."""
    model.gate.clear()
    running = asyncio.ensure_future(b.submit({"x": np.full((1, 1), 1.0)}, 1))
    await asyncio.sleep(0.05)
    queued = [asyncio.ensure_future(b.submit({"x": np.full((1, 1), 2.0)}, 1)) for _ in range(2)]
    await asyncio.sleep(0)
    assert b.stats.queued == 2
    return running, queued


async def test_close_lets_the_running_batch_finish_and_fails_the_queued_callers(pool):
    model = Model()
    b = batcher(model, pool, max_queue_delay_us=0)
    running, queued = await _held_batch(model, b)
    closing = asyncio.ensure_future(b.aclose())
    await asyncio.sleep(0.05)
    with pytest.raises(Unavailable, match="not loaded"):
        await b.submit({"x": np.zeros((1, 1))}, 1)  # closed to new calls at once
    model.gate.set()
    async with asyncio.timeout(5):  # every waiting caller hears, none hangs
        await closing
        result = await running
        outcomes = await asyncio.gather(*queued, return_exceptions=True)
    np.testing.assert_array_equal(result["y"], np.full((1, 1), 2.0))
    assert all(isinstance(o, Unavailable) and "unloaded" in o.message for o in outcomes)
    assert model.batches == [1]  # the queued calls never ran


async def test_close_with_drain_runs_every_queued_call(pool):
    model = Model()
    b = batcher(model, pool, max_queue_delay_us=0)
    running, queued = await _held_batch(model, b)
    closing = asyncio.ensure_future(b.aclose(drain=True))
    await asyncio.sleep(0.05)
    model.gate.set()
    async with asyncio.timeout(5):
        await closing
        results = await asyncio.gather(running, *queued)
    assert [r["y"][0, 0] for r in results] == [2.0, 4.0, 4.0]
    assert sum(model.batches) == 3


async def test_cancelling_close_fails_the_running_callers_with_a_clear_error(pool):
    model = Model()
    b = batcher(model, pool, max_queue_delay_us=0)
    running, queued = await _held_batch(model, b)
    closing = asyncio.ensure_future(b.aclose())
    await asyncio.sleep(0.05)
    closing.cancel()  # the closer gives up waiting: the callers must still hear
    try:
        async with asyncio.timeout(5):
            outcomes = await asyncio.gather(running, *queued, return_exceptions=True)
            with pytest.raises(asyncio.CancelledError):
                await closing
    finally:
        model.gate.set()  # free the model's thread
    assert all(isinstance(o, Unavailable) and "unloaded" in o.message for o in outcomes)


async def test_close_of_an_idle_batcher_returns_at_once(pool):
    b = batcher(Model(), pool)
    await b.submit({"x": np.zeros((1, 1))}, 1)
    async with asyncio.timeout(5):
        await b.aclose()
    with pytest.raises(Unavailable):
        await b.submit({"x": np.zeros((1, 1))}, 1)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 6), st.booleans(), st.integers(0, 3)), min_size=1, max_size=40
    ),
    st.integers(1, 16),
)
def test_every_caller_gets_exactly_its_rows(calls, max_rows):
    """Any mix of sizes, arrival gaps and cancellations: survivors get exactly their rows."""

    async def scenario():
        model = Model()
        with ThreadPoolExecutor(1) as executor:
            b = DynamicBatcher("m", model, BatchingConfig(max_rows, 500, 10_000), executor)
            tasks = []
            for i, (rows, cancel, gap) in enumerate(calls):
                rows = min(rows, max_rows)
                x = np.arange(rows, dtype=np.float64)[:, None] + 1000 * i
                tasks.append((asyncio.ensure_future(b.submit({"x": x}, rows)), x, cancel))
                for _ in range(gap):
                    await asyncio.sleep(0)
            for task, _, cancel in tasks:
                if cancel:
                    task.cancel()
            for task, x, cancel in tasks:
                try:
                    result = await task
                except asyncio.CancelledError:
                    assert cancel
                    continue
                np.testing.assert_array_equal(result["y"], x * 2)
            await b.aclose()
            assert max(model.batches, default=0) <= max_rows

    asyncio.run(scenario())
