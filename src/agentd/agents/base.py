"""The agent programming model: subclass :class:`Agent`, handle one message per turn."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from agentd.agents.address import Address
from agentd.agents.message import Message
from agentd.errors import AgentdError, Code, DeadlineExceeded, Unavailable

if TYPE_CHECKING:
    import numpy as np

    from agentd.runtime.actors import ActorHost

__all__ = ["Agent", "Context", "Reply"]

# What a turn may return: a Message, or plain text / bytes that become one. Agents talking
# to each other in-process (ctx.ask) may exchange any Python object.
Reply = Message | str | bytes


class _NotYet(AgentdError):
    code = Code.UNIMPLEMENTED


class Context:
    """What a turn can see and use. One per turn; not shared between turns."""

    __slots__ = ("_host", "address", "deadline", "state")

    def __init__(
        self,
        address: Address,
        state: dict[str, Any],
        deadline: float | None,
        host: ActorHost | None = None,
    ) -> None:
        self.address = address
        # Per-instance state, persisted when a turn changes it (JSON-serialisable values).
        self.state = state
        # Absolute deadline on the event loop's clock (loop.time()), or None.
        self.deadline = deadline
        self._host = host

    def time_left(self) -> float | None:
        """Seconds until the turn's deadline, or None without one."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - asyncio.get_running_loop().time())

    def _require_host(self) -> ActorHost:
        if self._host is None:
            raise _NotYet("this context is not attached to a runtime")
        return self._host

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        outputs: Sequence[str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Run a model, batched with other agents' calls; bounded by this turn's deadline.

        Cancelling the turn drops this call's rows if their batch has not formed yet.
        """
        host = self._host or self._require_host()
        result = host.infer_nowait(model, inputs, outputs)
        if self.deadline is None:
            return await result
        try:
            async with asyncio.timeout_at(self.deadline):
                return await result
        except TimeoutError:
            raise DeadlineExceeded(f"model {model!r} did not answer before the deadline") from None

    async def send(self, address: str | Address, message: Any) -> None:
        """Deliver ``message`` to another agent without waiting for its turn (waits only
        while the run queue is full)."""
        host = self._host or self._require_host()
        if not host.tell_nowait(address, message):
            await host.tell(address, message)

    async def ask(
        self, address: str | Address, message: Any, *, timeout: float | None = None
    ) -> Any:
        """Send ``message`` and await the other agent's reply (bounded by ``timeout`` and
        this turn's deadline)."""
        left = self.time_left()
        if left is not None:
            timeout = left if timeout is None else min(timeout, left)
        return await self._require_host().ask(address, message, timeout=timeout)

    async def generate(
        self,
        prompt: str | Sequence[Mapping[str, str]],
        *,
        model: str | None = None,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] = (),
    ) -> AsyncIterator[str]:
        """Stream text from a language model, piece by piece.

        ``prompt`` is raw text, or chat messages (``[{"role": "user", "content": ...}]``)
        rendered with the model's chat template. ``model`` defaults to the built-in
        ``tinylm``. Generation shares the token engine's batch with every other caller and
        stops at this turn's deadline; leaving the loop early frees its cache at once.
        """
        from agentd.generate.types import SamplingParams

        service = self._require_host().generation
        if service is None:
            raise _NotYet("this runtime has no language models")
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=tuple(stop),
        )
        params.validate()
        lm = service.get(model) if model else service.default()
        ids = lm.prompt_ids(prompt)
        pieces = lm.complete(ids, params).__aiter__()
        try:
            while True:
                left = self.time_left()
                try:
                    if left is None:
                        piece = await anext(pieces)
                    else:
                        piece = await asyncio.wait_for(anext(pieces), left)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise DeadlineExceeded(
                        f"model {lm.name!r} did not finish before the deadline"
                    ) from None
                yield piece
        finally:
            await pieces.aclose()

    async def tool(
        self, name: str, args: Mapping[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Call sandboxed tool ``name`` with keyword ``args`` (JSON-serialisable); return its
        result (parsed JSON). Runs in a fresh WebAssembly instance off the event loop,
        bounded by the tool limits, ``timeout`` and this turn's deadline.

        Raises (all from :mod:`agentd.tools.errors`): ToolNotFound, ToolArgumentsInvalid,
        ToolError (the tool raised; its message), ToolOutOfFuel, ToolOutOfMemory,
        ToolDeadlineExceeded, ToolOutputTooLarge, ToolsUnavailable.
        """
        tools = self._require_host().tools
        if tools is None:
            raise Unavailable("this runtime has no tool service")
        left = self.time_left()
        if left is not None:
            timeout = left if timeout is None else min(timeout, left)
        return await tools.call(name, args, timeout=timeout)


class Agent:
    """Base class of agent types.

    Set ``name`` (the address type) and override :meth:`handle`. Override :meth:`stream` to
    send several events per turn (tokens, progress). An instance handles one message at a
    time, so user code needs no locks.
    """

    # Empty slots: subclasses that declare __slots__ too cost a few bytes per instance.
    __slots__ = ()
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    async def handle(self, ctx: Context, message: Any) -> Any:
        raise NotImplementedError(f"agent type {self.name!r} does not handle messages")

    async def stream(self, ctx: Context, message: Any) -> AsyncIterator[Any]:
        """Stream a turn's events; by default one event, the reply of :meth:`handle`."""
        yield await self.handle(ctx, message)

    @classmethod
    def streams_natively(cls) -> bool:
        return cls.stream is not Agent.stream
