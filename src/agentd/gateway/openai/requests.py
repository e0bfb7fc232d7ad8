"""Validate OpenAI-style completion and chat requests into plain values.

Shapes follow the public OpenAI API reference. Every problem raises :class:`RequestError`
naming the offending field (OpenAI's ``param``), so clients get a 400 they can act on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from agentd.errors import InvalidArgument
from agentd.generate.chat import ROLES
from agentd.generate.types import (
    MAX_LOGIT_BIAS,
    MAX_PENALTY,
    MAX_SEED,
    MAX_TOP_LOGPROBS,
    SamplingParams,
)

__all__ = ["ChatRequest", "CompletionRequest", "RequestError", "parse_chat", "parse_completion"]

_MAX_STOPS = 4
MAX_N = 16  # choices per request: each is a sequence in the engine's batch
_MAX_BIASED = 1024  # logit_bias entries (OpenAI documents no limit; this bounds the work)
_MAX_LEGACY_LOGPROBS = 5  # the completions API's logprobs, as OpenAI caps it


class RequestError(InvalidArgument):
    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    model: str
    prompt: str
    params: SamplingParams
    stream: bool
    include_usage: bool
    n: int = 1
    echo: bool = False


@dataclass(frozen=True, slots=True)
class ChatRequest:
    model: str
    messages: list[dict[str, str]]
    params: SamplingParams
    stream: bool
    include_usage: bool
    n: int = 1


def _number(
    body: dict, name: str, default: float, low: float, high: float, *, low_open: bool = False
) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(f"'{name}' must be a number", name)
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise RequestError(f"'{name}' must be in {bracket}{low}, {high}], got {value}", name)
    return float(value)


def _integer(body: dict, name: str, default: int | None, low: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"'{name}' must be an integer", name)
    if value < low:
        raise RequestError(f"'{name}' must be at least {low}, got {value}", name)
    return value


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be a boolean", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object", "stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise RequestError(
            "'stream_options.include_usage' must be a boolean", "stream_options.include_usage"
        )
    return stream, include_usage


# Fields this server cannot honour, with the values that ask for nothing (clients and
# frameworks often send those): any other value is refused rather than silently ignored.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1),
    "suffix": (None, ""),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
}


def _refuse_unsupported(body: dict) -> None:
    for name, neutral in _UNSUPPORTED.items():
        value = body.get(name)
        if not any(_same(value, ok) for ok in neutral):
            raise RequestError(f"'{name}' is not supported by this server", name)


def _same(value: Any, ok: Any) -> bool:
    # A bool is an int to ==: False must not pass for 0, nor 1 for True.
    if isinstance(value, bool) or isinstance(ok, bool):
        return value is ok
    return bool(value == ok)


def _logit_bias(body: dict) -> tuple[tuple[int, float], ...]:
    """``{"token id": bias}`` (JSON keys are strings) as (id, bias) pairs."""
    value = body.get("logit_bias")
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise RequestError("'logit_bias' must be an object of token ids to numbers", "logit_bias")
    if len(value) > _MAX_BIASED:
        raise RequestError(f"'logit_bias' takes at most {_MAX_BIASED} tokens", "logit_bias")
    pairs = []
    for key, bias in value.items():
        if not (key.isascii() and key.isdigit()):
            raise RequestError(
                f"'logit_bias' keys must be token ids (integers), got {key!r}", "logit_bias"
            )
        token = int(key)
        if isinstance(bias, bool) or not isinstance(bias, int | float):
            raise RequestError(f"'logit_bias' values must be numbers, got {bias!r}", "logit_bias")
        if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            raise RequestError(
                f"'logit_bias' values must be in [-100, 100], got {bias}", "logit_bias"
            )
        pairs.append((token, float(bias)))
    return tuple(pairs)


def _common(body: Any, default_max_tokens: int | None) -> tuple[str, SamplingParams, int]:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", None)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("'model' is required and must be a string", "model")
    n = _integer(body, "n", 1, 1) or 1
    if n > MAX_N:
        raise RequestError(f"'n' must be in [1, {MAX_N}], got {n}", "n")
    _refuse_unsupported(body)
    max_tokens = _integer(body, "max_completion_tokens", None, 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", default_max_tokens, 1)
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise RequestError("'stop' must be a string or a list of strings", "stop")
    if len(stops) > _MAX_STOPS:
        raise RequestError(f"'stop' takes at most {_MAX_STOPS} sequences", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError("'seed' must be an integer", "seed")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise RequestError(f"'seed' must be in [0, 2**64), got {seed}", "seed")
    params = SamplingParams(
        # None means "as much as the context allows"; the caller fills it in.
        max_tokens=max_tokens if max_tokens is not None else 0,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=_integer(body, "top_k", 0, 0) or 0,
        seed=seed,
        stop=stops,
        presence_penalty=_number(body, "presence_penalty", 0.0, -MAX_PENALTY, MAX_PENALTY),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -MAX_PENALTY, MAX_PENALTY),
        logit_bias=_logit_bias(body),
    )
    return model, params, n


def _flag(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"'{name}' must be a boolean", name)
    return value


def parse_completion(body: Any) -> CompletionRequest:
    """``POST /v1/completions``; max_tokens defaults to 16 as in the OpenAI API.
    ``logprobs`` is an integer here (the legacy shape): how many alternatives per token."""
    model, params, n = _common(body, 16)
    if "top_logprobs" in body and body["top_logprobs"] is not None:
        raise RequestError(
            "'top_logprobs' is a chat parameter; completions take 'logprobs': <int>",
            "top_logprobs",
        )
    logprobs = body.get("logprobs")
    if logprobs is not None:
        if isinstance(logprobs, bool) or not isinstance(logprobs, int):
            raise RequestError("'logprobs' must be an integer (completions)", "logprobs")
        if not 0 <= logprobs <= _MAX_LEGACY_LOGPROBS:
            raise RequestError(
                f"'logprobs' must be in [0, {_MAX_LEGACY_LOGPROBS}], got {logprobs}", "logprobs"
            )
        params = dataclasses.replace(params, logprobs=True, top_logprobs=logprobs)
    echo = _flag(body, "echo")
    if echo and logprobs is not None:
        # The engine keeps no logits for prompt positions.
        raise RequestError(
            "'echo' together with 'logprobs' is not supported (no logprobs for prompt tokens)",
            "echo",
        )
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise RequestError("'prompt' must be a string (one prompt per request)", "prompt")
    stream, include_usage = _stream_flags(body)
    return CompletionRequest(model, prompt, params, stream, include_usage, n, echo)


def _content(value: Any, index: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for part in value:
            if not (
                isinstance(part, dict)
                and part.get("type") == "text"
                and isinstance(part.get("text"), str)
            ):
                raise RequestError(
                    f"messages[{index}].content parts must be {{'type': 'text', 'text': ...}}",
                    f"messages[{index}].content",
                )
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(
        f"messages[{index}].content must be a string or a list of text parts",
        f"messages[{index}].content",
    )


def parse_chat(body: Any) -> ChatRequest:
    """``POST /v1/chat/completions``; without max_tokens the reply may fill the context."""
    model, params, n = _common(body, None)
    if "echo" in body and body["echo"] is not None:
        raise RequestError("'echo' is a completions parameter", "echo")
    logprobs = _flag(body, "logprobs")
    top = body.get("top_logprobs")
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int):
            raise RequestError("'top_logprobs' must be an integer", "top_logprobs")
        if not 0 <= top <= MAX_TOP_LOGPROBS:
            raise RequestError(
                f"'top_logprobs' must be in [0, {MAX_TOP_LOGPROBS}], got {top}", "top_logprobs"
            )
        if top and not logprobs:
            raise RequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    if logprobs:
        params = dataclasses.replace(params, logprobs=True, top_logprobs=top or 0)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", "messages")
    parsed = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"messages[{index}] must be an object", f"messages[{index}]")
        role = message.get("role")
        if role == "developer":
            role = "system"
        if role not in ROLES:
            raise RequestError(
                f"messages[{index}].role must be one of {', '.join(ROLES)}, got {role!r}",
                f"messages[{index}].role",
            )
        parsed.append({"role": role, "content": _content(message.get("content"), index)})
    stream, include_usage = _stream_flags(body)
    return ChatRequest(model, parsed, params, stream, include_usage, n)
