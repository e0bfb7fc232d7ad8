"""OpenAI options on a real server through the ``openai`` package: n, logprobs and
top_logprobs (both shapes), penalties, logit_bias, echo, and their refusals."""

from __future__ import annotations

import asyncio
from importlib import resources
from pathlib import Path

import numpy as np
import openai
import pytest

from agentd.generate.chat import BOS
from agentd.generate.tokenizer import Tokenizer
from agentd.testing.lm import build_engine

MODEL = "tinylm"
PROMPT = "One, two, three,"
QUESTION = [{"role": "user", "content": "what colour is the sky?"}]
TINYLM = Path(str(resources.files("agentd.models") / "tinylm"))


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(TINYLM / "tokenizer.json")


@pytest.fixture(scope="module")
def reference():
    """``greedy(prompt, steps)``: the greedy tokens and a numpy log-softmax of the model's
    logits before each, from graph runs of the served model file (not through the
    gateway). Runs as the engine runs one sequence, a prefill then one decode per token:
    the int8 graph quantizes activations per run, so the run's shape matters in the last
    digits. Prompts stay under one cache block (16 tokens), so no prefix-cache hit
    changes the server's prefill either."""
    engine = build_engine(TINYLM / "model.onnx", blocks=16, block_size=16)
    pool = engine.pool
    blocks = np.asarray(pool.borrow(pool.total), dtype=np.int64)

    def greedy(prompt: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
        assert len(prompt) < 16
        tokens, rows, start = list(prompt), [], 0
        for _ in range(steps):
            positions = np.arange(start, len(tokens), dtype=np.int64)
            logits, new_k, new_v = engine.forward(
                np.asarray(tokens[start:], dtype=np.int64)[None, :],
                positions[None, :],
                np.array([start], np.int64),
                blocks[None, : pool.blocks_for(len(tokens))],
            )
            pool.write(blocks[positions // 16], positions % 16, new_k[:, 0], new_v[:, 0])
            row = logits[0].astype(np.float64)
            rows.append(row - row.max() - np.log(np.exp(row - row.max()).sum()))
            start = len(tokens)
            tokens.append(int(np.argmax(row)))
        return tokens[len(prompt) :], rows

    yield greedy
    asyncio.run(engine.close())


def test_n_greedy_choices_are_identical_and_usage_counts_them_all(client):
    result = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, n=4)
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    texts = {c.text for c in result.choices}
    assert len(texts) == 1 and texts.pop()
    single = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    assert result.choices[0].text == single.choices[0].text
    assert result.usage.prompt_tokens == single.usage.prompt_tokens
    assert result.usage.completion_tokens == 4 * single.usage.completion_tokens


def test_n_seeded_choices_are_independent_and_reproducible(client):
    kwargs = {
        "model": MODEL,
        "messages": QUESTION,
        "max_tokens": 12,
        "temperature": 2.0,
        "seed": 11,
        "n": 4,
    }
    first = [c.message.content for c in client.chat.completions.create(**kwargs).choices]
    again = [c.message.content for c in client.chat.completions.create(**kwargs).choices]
    assert first == again
    assert len(set(first)) > 1  # each choice draws on its own


def test_chat_logprobs_match_the_models_log_softmax(client, tokenizer, reference):
    result = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    choice = result.choices[0]
    entries = choice.logprobs.content
    assert len(entries) == result.usage.completion_tokens
    assert "".join(e.token for e in entries).startswith(choice.message.content)
    # The prompt ids as the server built them: replay them through the graph.
    from agentd.generate.service import LanguageModel

    ids = LanguageModel.chat_prompt(_Tokenized(tokenizer), QUESTION)
    assert len(ids) == result.usage.prompt_tokens
    tokens, rows = reference(ids, len(entries))
    for entry, token, expected in zip(entries, tokens, rows, strict=True):
        assert entry.token == tokenizer.decode([token], skip_special=False)
        assert entry.bytes == list(entry.token.encode())
        assert entry.logprob == pytest.approx(expected[token], abs=1e-5)
        top = entry.top_logprobs
        assert len(top) == 3
        assert [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True)
        assert top[0].token == entry.token and top[0].logprob == entry.logprob  # greedy
        best = np.argsort(-expected)[:3]
        assert [t.token for t in top] == [
            tokenizer.decode([int(i)], skip_special=False) for i in best
        ]
        np.testing.assert_allclose([t.logprob for t in top], expected[best], atol=1e-5)


def test_completion_logprobs_have_the_legacy_shape(client, tokenizer, reference):
    result = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2
    )
    choice = result.choices[0]
    lp = choice.logprobs
    assert "".join(lp.tokens).startswith(choice.text)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    tokens, rows = reference(tokenizer.encode(BOS + PROMPT), len(lp.tokens))
    for text, logprob, top, token, expected in zip(
        lp.tokens, lp.token_logprobs, lp.top_logprobs, tokens, rows, strict=True
    ):
        assert text == tokenizer.decode([token], skip_special=False)
        assert logprob == pytest.approx(expected[token], abs=1e-5)
        assert len(top) == 2 and top[text] == pytest.approx(logprob)


def test_streamed_logprobs_and_choices_match_the_whole_answer(client):
    kwargs = {
        "model": MODEL,
        "messages": QUESTION,
        "max_tokens": 8,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
        "n": 2,
    }
    whole = client.chat.completions.create(**kwargs)
    texts = ["", ""]
    tokens: list[list[str]] = [[], []]
    finish = [None, None]
    usage = None
    for chunk in client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.logprobs is not None:
                tokens[choice.index] += [e.token for e in choice.logprobs.content]
            finish[choice.index] = choice.finish_reason or finish[choice.index]
    for index, choice in enumerate(whole.choices):
        assert texts[index] == choice.message.content
        assert tokens[index] == [e.token for e in choice.logprobs.content]
        assert finish[index] == choice.finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_logit_bias_bans_and_forces_tokens(client, tokenizer):
    plain = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=0
    )
    first = tokenizer.encode(plain.choices[0].logprobs.tokens[0])
    assert len(first) == 1
    banned = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=4,
        temperature=0,
        logprobs=0,
        logit_bias={str(first[0]): -100},
    )
    assert banned.choices[0].logprobs.tokens[0] != plain.choices[0].logprobs.tokens[0]
    forced_id = tokenizer.encode(" blue")[0]
    forced = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=4,
        temperature=1.0,
        seed=3,
        logit_bias={str(forced_id): 100},
    )
    word = tokenizer.decode([forced_id])
    assert forced.choices[0].text == word * 4 or forced.choices[0].text.strip() == (
        " ".join([word.strip()] * 4)
    )


def test_penalties_stop_the_repetition(client):
    kwargs = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "count from 1 to 10"}],
        "max_tokens": 16,
        "temperature": 0,
    }
    plain = client.chat.completions.create(**kwargs).choices[0].message.content
    assert plain.count(",") >= 4  # "1, 2, 3, 4, 5, ..."
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        penalised = client.chat.completions.create(**kwargs, **penalty)
        text = penalised.choices[0].message.content
        # Each "," generated lowers the next one's logit: the list ends sooner.
        assert plain.startswith(text[:2]) and text.count(",") < plain.count(","), text
    # A negative penalty favours what was generated: nothing shorter than the plain list.
    rewarded = client.chat.completions.create(**kwargs, frequency_penalty=-1.0)
    assert rewarded.choices[0].message.content.count(",") >= plain.count(",")


def test_echo_prepends_the_prompt(client):
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    echoed = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=True
    )
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    pieces = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=True, stream=True
    )
    assert "".join(p.choices[0].text for p in pieces) == echoed.choices[0].text


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 17}, "n"),
        ({"logprobs": 6}, "logprobs"),
        ({"logprobs": 1, "echo": True}, "echo"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"logit_bias": {"5": 200}}, "logit_bias"),
        ({"logit_bias": {"10000000": 1}}, "logit_bias"),  # not in the vocabulary
        ({"logit_bias": {"x": 1}}, "logit_bias"),
    ],
)
def test_bad_completion_options_are_400_naming_them(client, extra, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2, **extra)
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == param
    assert param in caught.value.body["message"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"n": 0}, "n"),
        ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ],
)
def test_bad_chat_options_are_400_naming_them(client, extra, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2, **extra)
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == param


class _Tokenized:
    """Just enough of a LanguageModel for its chat_prompt (the server's prompt ids)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def _check_length(self, chars: int) -> None:
        pass
