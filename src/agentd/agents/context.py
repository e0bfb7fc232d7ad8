"""A turn's view of the world: :class:`Context`, one per turn.

A context calls its host (:class:`agentd.agents.host.AgentHost`) for inference, messages,
generation and tools. The runtime's actor host is one; ``agentd.testing.FakeHost`` is
another, for unit-testing an agent without a runtime.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from agentd.agents.address import Address
from agentd.agents.host import AgentHost
from agentd.errors import DeadlineExceeded, InvalidArgument, Unavailable, Unimplemented

if TYPE_CHECKING:
    import numpy as np

__all__ = ["Context"]


class Context:
    """What a turn can see and use. One per turn; not shared between turns."""

    __slots__ = ("_host", "address", "deadline", "state")

    def __init__(
        self,
        address: Address,
        state: dict[str, Any],
        deadline: float | None,
        host: AgentHost | None = None,
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

    def _require_host(self) -> AgentHost:
        if self._host is None:
            raise Unimplemented("this context is not attached to a runtime")
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
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: Mapping[int, float] | None = None,
    ) -> AsyncIterator[str]:
        """Stream text from a language model, piece by piece.

        ``prompt`` is raw text, or chat messages (``[{"role": "user", "content": ...}]``)
        rendered with the model's chat template. ``model`` defaults to the built-in
        ``tinylm``. Generation shares the token engine's batch with every other caller and
        stops at this turn's deadline; leaving the loop early frees its cache at once.

        ``presence_penalty`` and ``frequency_penalty`` (each in [-2, 2]) lower the logit of
        every token already generated, by ``presence`` once and ``frequency`` per use, as
        OpenAI defines them; ``logit_bias`` maps token ids to a bias in [-100, 100] added
        to their logits (-100 bans a token). A bad value raises InvalidArgument.
        """
        from agentd.generate.types import SamplingParams

        try:
            bias = tuple((int(k), float(v)) for k, v in (logit_bias or {}).items())
        except (TypeError, ValueError, AttributeError):
            raise InvalidArgument("logit_bias must map token ids (int) to numbers") from None
        service = self._require_host().generation
        if service is None:
            raise Unimplemented("this runtime has no language models")
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=tuple(stop),
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            logit_bias=bias,
        )
        params.validate()
        lm = service.get(model) if model else service.default()
        # A served model knows its vocabulary (another host's model may not say).
        info = getattr(getattr(lm, "generator", None), "info", None)
        if params.logit_bias and info is not None:
            params.check_vocab(info.vocab_size)
        ids = lm.prompt_ids(prompt)
        # Tracing on (the node's GenerationService holds span helpers): a ``generate`` span
        # under this turn's; other hosts' models take no ``spans``.
        spans = getattr(service, "spans", None)
        if spans is None:
            pieces = aiter(lm.complete(ids, params))
        else:
            pieces = aiter(lm.complete(ids, params, spans=spans))  # type: ignore[call-arg]
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
            # Leaving early frees the model's cache for this sequence at once.
            aclose = getattr(pieces, "aclose", None)
            if aclose is not None:
                await aclose()

    async def embed(self, texts: str | Sequence[str], *, model: str) -> np.ndarray:
        """Vectors of ``texts`` from an embedding model (``kind: embedding``): float32
        ``[len(texts), dimensions]`` (one row for a single string), pooled and normalised as
        the model's config says. Batched with other callers; bounded by this turn's
        deadline."""
        host = self._require_host()
        embed = getattr(host, "embed", None)  # hosts without embedding models lack it
        if embed is None:
            raise Unimplemented("this runtime has no embedding models")
        call = embed(model, [texts] if isinstance(texts, str) else list(texts))
        if self.deadline is None:
            return await call
        try:
            async with asyncio.timeout_at(self.deadline):
                return await call
        except TimeoutError:
            raise DeadlineExceeded(f"model {model!r} did not answer before the deadline") from None

    async def tool(
        self, name: str, args: Mapping[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Call sandboxed tool ``name`` with keyword ``args`` (JSON-serialisable); return its
        result (parsed JSON). Runs in a fresh WebAssembly instance off the event loop,
        bounded by the tool limits, ``timeout`` and this turn's deadline.

        Raises :class:`agentd.tools.ToolError`; its ``kind`` (a ``ToolErrorKind``) says
        why: ``not_found``, ``invalid_arguments``, ``raised`` (the tool raised; its message),
        ``out_of_fuel``, ``out_of_memory``, ``deadline``, ``output_too_large``,
        ``unavailable``, ... (docs/tools.md lists them with their codes).
        """
        tools = self._require_host().tools
        if tools is None:
            raise Unavailable("this runtime has no tool service")
        left = self.time_left()
        if left is not None:
            timeout = left if timeout is None else min(timeout, left)
        return await tools.call(name, args, timeout=timeout)
