"""OpenAI request validation: any JSON value gives a valid request or a RequestError that
names a field, never another exception."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentd.gateway.openai.requests import RequestError, parse_chat, parse_completion
from agentd.generate.sampling import Sampler

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
fields = {
    "model": st.one_of(st.just("tinylm"), json_values),
    "prompt": json_values,
    "messages": st.one_of(
        st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "system", "assistant", "developer", "x"])},
                optional={"content": json_values},
            ),
            max_size=3,
        ),
        json_values,
    ),
    "max_tokens": json_values,
    "temperature": json_values,
    "top_p": json_values,
    "top_k": json_values,
    "seed": json_values,
    "stop": json_values,
    "stream": json_values,
    "stream_options": json_values,
    "n": json_values,
    "presence_penalty": json_values,
    "frequency_penalty": json_values,
    "logit_bias": json_values,
    "logprobs": json_values,
    "top_logprobs": json_values,
    "echo": json_values,
    "tools": json_values,
    "response_format": json_values,
}
bodies = st.one_of(json_values, st.fixed_dictionaries({}, optional=fields))


@settings(max_examples=400, deadline=None)
@given(body=bodies)
def test_any_body_parses_or_names_its_problem(body):
    for parse in (parse_completion, parse_chat):
        try:
            request = parse(body)
        except RequestError as exc:
            assert exc.message
            assert exc.param is None or isinstance(exc.param, str)
        else:
            params = request.params
            assert params.max_tokens >= 0
            assert 0.0 <= params.temperature <= 2.0
            assert 0.0 < params.top_p <= 1.0
            assert params.top_k >= 0
            assert all(isinstance(s, str) for s in params.stop) and len(params.stop) <= 4
            # What parses is fit for the engine (a negative seed once passed and crashed it);
            # max_tokens 0 stands for "fill the context" until the route sets it.
            if params.max_tokens:
                params.validate()
            Sampler(params)


def test_valid_requests_keep_their_values():
    request = parse_chat(
        {
            "model": "tinylm",
            "messages": [{"role": "developer", "content": [{"type": "text", "text": "hi"}]}],
            "max_completion_tokens": 7,
            "temperature": 0,
            "stop": "\n",
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    assert request.messages == [{"role": "system", "content": "hi"}]
    assert request.params.max_tokens == 7 and request.params.greedy
    assert request.params.stop == ("\n",)
    assert request.stream and request.include_usage
    assert parse_completion({"model": "m", "prompt": ["one"]}).params.max_tokens == 16


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "prompt": "x", "temperature": 2.5}, "temperature"),
        ({"model": "m", "prompt": "x", "seed": 1.5}, "seed"),
        ({"model": "m", "prompt": "x", "seed": -1}, "seed"),
        ({"model": "m", "prompt": "x", "seed": 2**64}, "seed"),
        ({"model": "m", "prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
        ({"model": "m", "prompt": "x", "frequency_penalty": -2.1}, "frequency_penalty"),
        ({"model": "m", "prompt": "x", "frequency_penalty": "0"}, "frequency_penalty"),
        ({"model": "m", "prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
        ({"model": "m", "prompt": "x", "logit_bias": {"five": 1}}, "logit_bias"),
        ({"model": "m", "prompt": "x", "logit_bias": {"-5": 1}}, "logit_bias"),
        ({"model": "m", "prompt": "x", "logit_bias": {"5": True}}, "logit_bias"),
        ({"model": "m", "prompt": "x", "logit_bias": [5]}, "logit_bias"),
        ({"model": "m", "prompt": "x", "n": 17}, "n"),
        ({"model": "m", "prompt": "x", "n": 0}, "n"),
        ({"model": "m", "prompt": "x", "suffix": "end"}, "suffix"),
        ({"model": "m", "prompt": "x", "best_of": 3}, "best_of"),
        ({"model": "m", "prompt": "x", "top_logprobs": 2}, "top_logprobs"),
        ({"model": "m", "prompt": "x", "tools": [{"type": "function"}]}, "tools"),
        ({"model": "m", "prompt": "x", "tool_choice": "required"}, "tool_choice"),
        (
            {"model": "m", "prompt": "x", "response_format": {"type": "json_object"}},
            "response_format",
        ),
        ({"model": "m", "prompt": "x", "echo": 0}, "echo"),
        ({"model": "m", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": "m", "prompt": "x", "logprobs": 6}, "logprobs"),
        ({"model": "m", "prompt": "x", "logprobs": True}, "logprobs"),
        ({"model": "m", "prompt": "x", "logprobs": 1, "echo": True}, "echo"),
        ({"prompt": "x"}, "model"),
    ],
)
def test_each_bad_field_is_named(body, param):
    with pytest.raises(RequestError) as caught:
        parse_completion(body)
    assert caught.value.param == param


def test_fields_sent_with_values_that_ask_for_nothing_are_accepted():
    # What frameworks send by default must not be refused.
    request = parse_chat(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "presence_penalty": 0.0,
            "frequency_penalty": 0,
            "logit_bias": {},
            "tools": [],
            "tool_choice": "auto",
            "response_format": {"type": "text"},
            "logprobs": False,
            "top_logprobs": None,
            "seed": 2**64 - 1,
        }
    )
    assert request.params.seed == 2**64 - 1
    Sampler(request.params)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"logprobs": 1}, "logprobs"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),  # needs logprobs: true
        ({"top_logprobs": 1.5, "logprobs": True}, "top_logprobs"),
        ({"echo": True}, "echo"),
        ({"n": 100}, "n"),
    ],
)
def test_each_bad_chat_option_is_named(extra, param):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}
    with pytest.raises(RequestError) as caught:
        parse_chat(body)
    assert caught.value.param == param


def test_openai_options_reach_the_sampling_params():
    chat = parse_chat(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "n": 4,
            "logprobs": True,
            "top_logprobs": 3,
            "presence_penalty": -0.5,
            "frequency_penalty": 1.25,
            "logit_bias": {"7": -100, "12": 2.5},
        }
    )
    assert chat.n == 4
    params = chat.params
    assert params.logprobs and params.top_logprobs == 3
    assert (params.presence_penalty, params.frequency_penalty) == (-0.5, 1.25)
    assert params.logit_bias == ((7, -100.0), (12, 2.5))
    completion = parse_completion({"model": "m", "prompt": "x", "logprobs": 2, "n": 2})
    assert completion.params.logprobs and completion.params.top_logprobs == 2
    assert completion.n == 2 and not completion.echo
    assert parse_completion({"model": "m", "prompt": "x", "echo": True}).echo
    # logprobs 0: the chosen token's logprob, no alternatives.
    zero = parse_completion({"model": "m", "prompt": "x", "logprobs": 0}).params
    assert zero.logprobs and zero.top_logprobs == 0
