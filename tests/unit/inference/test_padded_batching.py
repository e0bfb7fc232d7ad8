"""The micro-batcher's padded mode (``pad_ragged``, for encoders): callers' sequences of
different lengths share one run, zero-padded to the longest, and each caller gets its own
rows cut back to its own length."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from agentd.errors import InvalidArgument
from agentd.inference import BatchingConfig, DynamicBatcher


class Recorder:
    """Doubles ``x`` (keeping its sequence axis) and sums each row; records run shapes."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, inputs):
        x = inputs["x"]
        self.shapes.append(x.shape)
        return {"y": x * 2, "total": x.sum(axis=1)}


async def test_ragged_callers_share_a_padded_run_and_get_their_own_lengths() -> None:
    model = Recorder()
    config = BatchingConfig(16, 50_000, 100, pad_ragged=True)
    with ThreadPoolExecutor(1) as pool:
        batcher = DynamicBatcher("enc", model, config, pool)
        calls = [
            np.arange(1, 1 + rows * length).reshape(rows, length)
            for rows, length in [(1, 3), (2, 7), (1, 1)]
        ]
        try:
            results = await asyncio.gather(*(batcher.submit({"x": c}, c.shape[0]) for c in calls))
        finally:
            await batcher.aclose()
    assert model.shapes == [(4, 7)]  # one run, padded to the longest
    for call, result in zip(calls, results, strict=True):
        np.testing.assert_array_equal(result["y"], call * 2)
        np.testing.assert_array_equal(result["total"], call.sum(axis=1))  # zeros add nothing


async def test_inputs_of_different_lengths_in_one_call_are_refused() -> None:
    with ThreadPoolExecutor(1) as pool:
        batcher = DynamicBatcher(
            "enc", Recorder(), BatchingConfig(16, 0, 100, pad_ragged=True), pool
        )
        try:
            with pytest.raises(InvalidArgument, match="same length on axis 1"):
                batcher.submit_nowait({"x": np.zeros((1, 3)), "m": np.zeros((1, 4))}, 1)
            with pytest.raises(InvalidArgument, match="same length on axis 1"):
                batcher.submit_nowait({"x": np.zeros(3)}, 3)
        finally:
            await batcher.aclose()
