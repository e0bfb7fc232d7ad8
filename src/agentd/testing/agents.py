"""Unit-test an agent without a runtime: a fake host with canned answers that records what
the agent did, and :func:`run_turn`, which runs one turn with a given state.

::

    from agentd.testing import FakeHost, run_turn

    async def test_greeter():
        host = FakeHost(tools={"km_to_miles": lambda km: km / 1.6})
        turn = await run_turn(Greeter(), Message(text="world"), {"visits": 1}, host=host)
        assert turn.reply == "hello world, visit 2 to greeter/default"
        assert turn.state == {"visits": 2}

Canned answers (``infer``, ``generate``, ``tools``, ``asks``) are either a value or a
callable computing one (sync or async); an exception instance is raised instead of
returned. What the runtime would refuse, the fake refuses the same way: a malformed
address is InvalidArgument, an unknown model or asked agent NotFound, an unknown tool a
ToolError of kind ``not_found``, a state that is not JSON-serialisable Internal.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from agentd.agents import Address, Agent, Context, parse_address
from agentd.errors import DeadlineExceeded, Internal, InvalidArgument, NotFound
from agentd.tools.errors import ToolError, ToolErrorKind

__all__ = ["Asked", "FakeHost", "Generated", "Inferred", "ToolCall", "Turn", "run_turn"]

# A canned answer: the value itself, an exception to raise, or a function computing either
# from the call's input (sync or async).
Canned = Any


async def _answer(canned: Canned, *args: Any, **kwargs: Any) -> Any:
    value = canned(*args, **kwargs) if callable(canned) else canned
    if inspect.isawaitable(value):
        value = await value
    if isinstance(value, BaseException):
        raise value
    return value


@dataclass(frozen=True, slots=True)
class Inferred:
    model: str
    inputs: Mapping[str, np.ndarray]
    outputs: Sequence[str] | None


@dataclass(frozen=True, slots=True)
class Generated:
    model: str
    prompt: str | Sequence[Mapping[str, str]]
    params: Any  # agentd.generate.types.SamplingParams


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    args: Mapping[str, Any]
    timeout: float | None


@dataclass(frozen=True, slots=True)
class Asked:
    address: Address
    message: Any
    timeout: float | None


class _FakeModel:
    def __init__(self, host: FakeHost, name: str, canned: Canned) -> None:
        self._host = host
        self._name = name
        self._canned = canned

    @property
    def name(self) -> str:
        return self._name

    def prompt_ids(self, prompt: Any) -> Any:
        return prompt  # the fake "tokenizer" keeps the prompt as it is, for the record

    async def complete(self, prompt_ids: Any, params: Any) -> AsyncIterator[str]:
        self._host.generated.append(Generated(self._name, prompt_ids, params))
        text = await _answer(self._canned, prompt_ids)
        for piece in [text] if isinstance(text, str) else text:
            yield piece


class _FakeModels:
    def __init__(self, host: FakeHost, canned: Mapping[str, Canned], default: str) -> None:
        self._models = {name: _FakeModel(host, name, c) for name, c in canned.items()}
        self._default = default

    def get(self, name: str) -> _FakeModel:
        model = self._models.get(name)
        if model is None:
            raise NotFound(f"no language model named {name!r}")
        return model

    def default(self) -> _FakeModel:
        return self.get(self._default)


class _FakeTools:
    def __init__(self, host: FakeHost, canned: Mapping[str, Canned]) -> None:
        self._host = host
        self._canned = dict(canned)

    async def call(
        self, name: str, arguments: Mapping[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        args = dict(arguments or {})
        self._host.tool_calls.append(ToolCall(name, args, timeout))
        if name not in self._canned:
            raise ToolError(ToolErrorKind.NOT_FOUND, f"no tool named {name!r}")
        return await _answer(self._canned[name], **args)


class FakeHost:
    """A host for an agent's turns with canned answers, recording every call.

    * ``infer``: model name -> its outputs (a dict of arrays), or a function of the inputs.
      Only the outputs asked for come back.
    * ``generate``: language model name -> its text (a string: one piece; a list of
      strings: the pieces), or a function of the prompt. ``ctx.generate`` without a model
      uses ``default_model``. None: the host has no language models (Unimplemented).
    * ``tools``: tool name -> its result, or a function called with the tool's keyword
      arguments. None: the host has no tools (Unavailable).
    * ``asks``: address (``type/id``, or a bare ``type`` for every id) -> the reply, or a
      function of the message.

    Recorded, in order: ``inferred``, ``generated``, ``tool_calls``, ``asked`` and ``sent``
    (``(address, message)`` pairs of ``ctx.send``).
    """

    def __init__(
        self,
        *,
        infer: Mapping[str, Canned] | None = None,
        generate: Mapping[str, Canned] | None = None,
        default_model: str = "tinylm",
        tools: Mapping[str, Canned] | None = None,
        asks: Mapping[str, Canned] | None = None,
    ) -> None:
        self._infer = dict(infer or {})
        self._asks = dict(asks or {})
        self._generation = None if generate is None else _FakeModels(self, generate, default_model)
        self._tools = None if tools is None else _FakeTools(self, tools)
        self.inferred: list[Inferred] = []
        self.generated: list[Generated] = []
        self.tool_calls: list[ToolCall] = []
        self.asked: list[Asked] = []
        self.sent: list[tuple[Address, Any]] = []

    @property
    def generation(self) -> _FakeModels | None:
        return self._generation

    @property
    def tools(self) -> _FakeTools | None:
        return self._tools

    def infer_nowait(
        self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None
    ) -> Awaitable[dict[str, np.ndarray]]:
        self.inferred.append(Inferred(model, inputs, outputs))
        if model not in self._infer:
            raise NotFound(f"no model named {model!r}")
        return asyncio.ensure_future(self._infer_one(model, inputs, outputs))

    async def _infer_one(
        self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None
    ) -> dict[str, np.ndarray]:
        result = dict(await _answer(self._infer[model], inputs))
        if outputs is None:
            return result
        missing = [name for name in outputs if name not in result]
        if missing:
            raise InvalidArgument(f"model {model!r} has no output {missing[0]!r}")
        return {name: result[name] for name in outputs}

    def tell_nowait(self, address: str | Address, message: Any) -> bool:
        self.sent.append((_address(address), message))
        return True

    async def tell(
        self, address: str | Address, message: Any, *, timeout: float | None = None
    ) -> None:
        self.tell_nowait(address, message)

    async def ask(
        self, address: str | Address, message: Any, *, timeout: float | None = None
    ) -> Any:
        addr = _address(address)
        self.asked.append(Asked(addr, message, timeout))
        for key in (f"{addr.type}/{addr.id}", addr.type):
            if key in self._asks:
                return await _answer(self._asks[key], message)
        raise NotFound(f"no canned reply for agent {addr}")


def _address(address: str | Address) -> Address:
    return parse_address(address) if isinstance(address, str) else address


@dataclass(slots=True)
class Turn:
    """What one turn did: its reply (for a streamed turn, the list of its events) and the
    state it left (a copy, as the store would hold it)."""

    reply: Any
    state: dict[str, Any]


async def run_turn(
    agent: Agent | type[Agent],
    message: Any,
    state: Mapping[str, Any] | None = None,
    *,
    host: FakeHost | None = None,
    address: str | Address | None = None,
    timeout: float | None = None,
    stream: bool = False,
) -> Turn:
    """Run one turn of ``agent`` on ``message`` with ``state`` (default: empty, as for a new
    agent), as the runtime would: the agent works on a copy of the state, and the state it
    leaves must be JSON-serialisable. ``address`` defaults to ``<agent.name>/default``;
    ``timeout`` (seconds) sets the turn's deadline (DeadlineExceeded past it); ``stream``
    runs ``agent.stream`` and returns its events as the reply. The agent's own errors
    propagate (the runtime would roll the state back).
    """
    instance = agent() if isinstance(agent, type) else agent
    if address is None:
        address = Address(instance.name or "agent", "default")
    addr = _address(address)
    working = orjson.loads(orjson.dumps(dict(state or {})))
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    ctx = Context(addr, working, deadline, host if host is not None else FakeHost())
    try:
        async with asyncio.timeout_at(deadline):
            if stream:
                reply: Any = [event async for event in instance.stream(ctx, message)]
            else:
                reply = await instance.handle(ctx, message)
    except TimeoutError:
        raise DeadlineExceeded(f"agent {addr} did not finish in time") from None
    try:
        new_state = orjson.loads(orjson.dumps(ctx.state))
    except TypeError as exc:
        raise Internal(f"agent {addr} state is not JSON-serialisable: {exc}") from None
    return Turn(reply, new_state)
