"""Sampler options: OpenAI's penalties and logit_bias (exact numbers on small logits),
logprobs and top_logprobs, and the fast path left alone when nothing is asked."""

from __future__ import annotations

import numpy as np
import pytest

from agentd import Agent
from agentd.errors import InvalidArgument
from agentd.generate.sampling import Sampler, log_softmax
from agentd.generate.serial import SerialGenerator
from agentd.generate.service import GenerationService
from agentd.generate.types import SamplingParams, ScoredToken
from agentd.models.catalog import builtin_models_dir
from agentd.testing import FakeHost, run_turn

LOGITS = np.array([1.0, 3.0, 2.5, 0.0, -1.0], dtype=np.float32)


def reference_log_softmax(row: np.ndarray) -> np.ndarray:
    row = row.astype(np.float64)
    return row - np.log(np.sum(np.exp(row)))


def test_no_option_keeps_the_batched_argmax_path() -> None:
    sampler = Sampler(SamplingParams(temperature=0.0))
    assert sampler.greedy  # the runner may take its pick from one batched argmax
    token = sampler(LOGITS)
    assert token == 1 and type(token) is int
    for params in (
        SamplingParams(temperature=0.0, presence_penalty=0.5),
        SamplingParams(temperature=0.0, logit_bias=((0, 5.0),)),
        SamplingParams(temperature=0.0, logprobs=True),
    ):
        assert not Sampler(params).greedy  # its own pick: the runner must call it


def test_logit_bias_is_added_to_the_logits() -> None:
    # 1.0 + 2.5 = 3.5 beats 3.0; -100 on token 2 changes nothing then.
    sampler = Sampler(SamplingParams(temperature=0.0, logit_bias=((0, 2.5), (2, -100.0))))
    assert [sampler(LOGITS) for _ in range(3)] == [0, 0, 0]
    # 1.0 + 1.9 = 2.9 loses to 3.0.
    assert Sampler(SamplingParams(temperature=0.0, logit_bias=((0, 1.9),)))(LOGITS) == 1
    # -100 bans a token.
    assert Sampler(SamplingParams(temperature=0.0, logit_bias=((1, -100.0),)))(LOGITS) == 2


def test_presence_penalty_lowers_each_seen_token_once() -> None:
    # Token 1 (3.0) is picked, then drops to 3.0 - 0.6 = 2.4 < 2.5: token 2 next, which
    # drops to 1.9; token 1 at 2.4 is the best again, and stays 2.4 (presence counts once).
    sampler = Sampler(SamplingParams(temperature=0.0, presence_penalty=0.6))
    assert [sampler(LOGITS) for _ in range(4)] == [1, 2, 1, 1]


def test_frequency_penalty_grows_with_the_count() -> None:
    # 0.3 per occurrence: token 1 is 3.0, 2.7, 2.4 after 0, 1, 2 picks; token 2 is 2.5, 2.2.
    sampler = Sampler(SamplingParams(temperature=0.0, frequency_penalty=0.3))
    assert [sampler(LOGITS) for _ in range(5)] == [1, 1, 2, 1, 2]


def test_negative_penalties_favour_repeats() -> None:
    logits = np.array([2.0, 2.1, 0.0])
    sampler = Sampler(SamplingParams(temperature=0.0, presence_penalty=-2.0))
    assert [sampler(logits) for _ in range(3)] == [1, 1, 1]


def test_penalties_shift_the_sampled_distribution_exactly() -> None:
    # At temperature 1 with top_k 2 the draw is between the two best shaped logits; with
    # presence 1 and frequency 0.5 after token 1 was picked twice, token 1 is 3.0 - 2.0.
    params = SamplingParams(temperature=1.0, presence_penalty=1.0, frequency_penalty=0.5)
    sampler = Sampler(params)
    sampler._counts = {1: 2}  # as if it had generated token 1 twice
    shaped = sampler._shape(LOGITS)
    expected = LOGITS.astype(np.float64).copy()
    expected[1] -= 2 * 0.5 + 1.0
    np.testing.assert_array_equal(shaped, expected)


def test_logprobs_are_a_log_softmax_of_the_raw_logits() -> None:
    rng = np.random.default_rng(3)
    rows = [rng.standard_normal(50).astype(np.float32) * 4 for _ in range(8)]
    params = SamplingParams(temperature=0.8, seed=5, logprobs=True, top_logprobs=5)
    plain = Sampler(SamplingParams(temperature=0.8, seed=5))
    sampler = Sampler(params)
    for row in rows:
        token = sampler(row)
        assert isinstance(token, ScoredToken)
        assert int(token) == plain(row)  # asking for logprobs changes no pick
        reference = reference_log_softmax(row)
        assert token.logprob == pytest.approx(reference[token], abs=1e-9)
        ids = [alt for alt, _ in token.top]
        assert ids == list(np.argsort(-reference, kind="stable")[:5])
        values = [lp for _, lp in token.top]
        assert values == sorted(values, reverse=True)
        np.testing.assert_allclose(values, reference[ids], atol=1e-9)
        # The chosen token's logprob is at most the best alternative's.
        assert token.logprob <= values[0] + 1e-12


def test_logprobs_ignore_bias_and_temperature() -> None:
    # The pick follows the bias; the reported logprob is still the model's own.
    sampler = Sampler(
        SamplingParams(temperature=0.0, logit_bias=((4, 100.0),), logprobs=True, top_logprobs=2)
    )
    token = sampler(LOGITS)
    reference = reference_log_softmax(LOGITS)
    assert int(token) == 4
    assert token.logprob == pytest.approx(reference[4])
    assert [alt for alt, _ in token.top] == [1, 2]


def test_top_logprobs_zero_gives_only_the_chosen_token() -> None:
    token = Sampler(SamplingParams(temperature=0.0, logprobs=True))(LOGITS)
    assert int(token) == 1 and token.top == ()
    assert token.logprob == pytest.approx(log_softmax(LOGITS)[1])


def test_ties_in_top_logprobs_keep_id_order() -> None:
    token = Sampler(SamplingParams(temperature=0.0, logprobs=True, top_logprobs=3))(
        np.zeros(6, np.float32)
    )
    assert [alt for alt, _ in token.top] == [0, 1, 2]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (SamplingParams(presence_penalty=2.5), "presence_penalty"),
        (SamplingParams(frequency_penalty=-2.01), "frequency_penalty"),
        (SamplingParams(logit_bias=((3, 101.0),)), "logit_bias"),
        (SamplingParams(logit_bias=((-1, 1.0),)), "logit_bias"),
        (SamplingParams(logprobs=True, top_logprobs=21), "top_logprobs"),
    ],
)
def test_validate_names_the_bad_option(params: SamplingParams, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        params.validate()


def test_check_vocab_refuses_an_unknown_token() -> None:
    SamplingParams(logit_bias=((4, 1.0),)).check_vocab(5)
    with pytest.raises(InvalidArgument, match="logit_bias token id 5"):
        SamplingParams(logit_bias=((5, 1.0),)).check_vocab(5)


class Writer(Agent):
    """Generates with the options its message names."""

    name = "writer"

    async def handle(self, ctx, message):
        options = {"max_tokens": 16, **message}
        prompt = [{"role": "user", "content": "count from 1 to 10"}]
        return "".join([piece async for piece in ctx.generate(prompt, **options)])


class _ServedHost(FakeHost):
    """A FakeHost whose language models are a real GenerationService (the built-in tinylm)."""

    def __init__(self, service: GenerationService) -> None:
        super().__init__()
        self._service = service

    @property
    def generation(self) -> GenerationService:  # type: ignore[override]
        return self._service


async def test_ctx_generate_takes_penalties_and_logit_bias() -> None:
    service = GenerationService([builtin_models_dir()], threads=1)
    await service.start()
    try:
        host = _ServedHost(service)

        async def write(**options: object) -> str:
            return (await run_turn(Writer, options, host=host)).reply

        plain = await write()
        assert plain.count(",") >= 4  # "1, 2, 3, 4, 5, ..."
        # Each "," generated lowers the next one's logit: the list ends sooner.
        assert (await write(frequency_penalty=2.0)).count(",") < plain.count(",")
        assert (await write(presence_penalty=2.0)).count(",") < plain.count(",")
        tokenizer = service.get("tinylm").tokenizer
        comma = tokenizer.encode(",")
        assert len(comma) == 1
        banned = await write(logit_bias={comma[0]: -100})
        assert "," not in banned and banned != plain
        for bad, named in (
            ({"presence_penalty": 3.0}, "presence_penalty"),
            ({"logit_bias": {comma[0]: 500}}, "logit_bias"),
            ({"logit_bias": {10**9: 1.0}}, "logit_bias token id"),
            ({"logit_bias": {"comma": 1.0}}, "logit_bias"),
            ({"logit_bias": [1, 2]}, "logit_bias"),
        ):
            with pytest.raises(InvalidArgument, match=named):
                await write(**bad)
    finally:
        await service.aclose()


async def test_the_serial_backend_path_delivers_logprobs_and_applies_bias() -> None:
    # GGUF and HF run through SerialGenerator: its tokens carry their logprobs too.
    from tests.generate.test_serial import VOCAB, CountingBackend

    generator = SerialGenerator(CountingBackend())
    try:
        params = SamplingParams(
            temperature=0.0, max_tokens=3, logprobs=True, top_logprobs=2, logit_bias=((9, 50.0),)
        )
        tokens = [token async for token in generator.stream([5], params)]
    finally:
        await generator.close()
    # The backend puts logit 10 on the last token + 1 (6 after the prompt, then 10); the
    # bias of 50 makes 9 win every time. The logprobs are the backend's own.
    assert tokens == [9, 9, 9]
    assert all(isinstance(token, ScoredToken) for token in tokens)
    for token, favoured in zip(tokens, (6, 10, 10), strict=True):
        expected = log_softmax(np.where(np.arange(VOCAB) == favoured, 10.0, 0.0))
        assert token.logprob == pytest.approx(expected[9])
        assert token.top[0] == (favoured, pytest.approx(expected[favoured]))
