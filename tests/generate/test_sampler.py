"""Sampler: greedy, seeded sampling, top-k and top-p cuts."""

from __future__ import annotations

import numpy as np

from agentd.generate.sampling import Sampler
from agentd.generate.types import SamplingParams

RNG = np.random.default_rng(7)
ROWS = [RNG.standard_normal(300).astype(np.float32) * 3 for _ in range(20)]


def test_greedy_is_argmax() -> None:
    sampler = Sampler(SamplingParams(temperature=0.0, seed=1))
    assert [sampler(row) for row in ROWS] == [int(np.argmax(row)) for row in ROWS]


def test_seeded_sampling_is_reproducible() -> None:
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    first = Sampler(params)
    second = Sampler(params)
    picks = [first(row) for row in ROWS]
    assert picks == [second(row) for row in ROWS]
    # Real sampling: at temperature 1 over spread-out logits it does not always pick argmax.
    assert picks != [int(np.argmax(row)) for row in ROWS]
    other = Sampler(SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=99))
    assert [other(row) for row in ROWS] != picks


def test_top_k_one_is_greedy() -> None:
    sampler = Sampler(SamplingParams(temperature=1.5, top_k=1, seed=3))
    assert [sampler(row) for row in ROWS] == [int(np.argmax(row)) for row in ROWS]


def test_tiny_top_p_is_greedy() -> None:
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=1e-6, seed=3))
    assert [sampler(row) for row in ROWS] == [int(np.argmax(row)) for row in ROWS]


def test_sampling_follows_the_distribution() -> None:
    logits = np.log(np.array([0.7, 0.2, 0.1], dtype=np.float64))
    sampler = Sampler(SamplingParams(temperature=1.0, seed=5))
    counts = np.bincount([sampler(logits) for _ in range(4000)], minlength=3) / 4000
    assert np.allclose(counts, [0.7, 0.2, 0.1], atol=0.03)
    top_k = Sampler(SamplingParams(temperature=1.0, top_k=2, seed=5))
    assert {top_k(logits) for _ in range(500)} == {0, 1}
