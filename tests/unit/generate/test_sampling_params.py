"""SamplingParams.validate: the check for callers inside the process (ctx.generate)."""

from __future__ import annotations

import numpy as np
import pytest

from agentd.errors import InvalidArgument
from agentd.generate.sampling import Sampler
from agentd.generate.types import MAX_SEED, SamplingParams


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"seed": -1}, "seed"),
        ({"seed": MAX_SEED + 1}, "seed"),
    ],
)
def test_out_of_range_fields_are_named(fields, named):
    with pytest.raises(InvalidArgument, match=named):
        SamplingParams(**fields).validate()


@pytest.mark.parametrize("seed", [None, 0, 7, MAX_SEED])
def test_valid_params_pass_and_make_a_sampler(seed):
    params = SamplingParams(max_tokens=1, temperature=0.7, top_p=0.9, top_k=5, seed=seed)
    params.validate()
    assert 0 <= Sampler(params)(np.arange(8, dtype=np.float32)) < 8
