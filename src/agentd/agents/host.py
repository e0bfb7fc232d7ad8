"""What an agent's :class:`~agentd.agents.Context` needs from whatever runs it.

The runtime's actor host is one such host; ``agentd.testing.FakeHost`` is another, for
unit-testing an agent without a runtime. Typed structurally (``typing.Protocol``) so that
the agent SDK never imports the runtime: the dependency points from the runtime to here.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Awaitable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from agentd.agents.address import Address

if TYPE_CHECKING:
    import numpy as np

    from agentd.generate.types import SamplingParams

__all__ = ["AgentHost", "LanguageModel", "LanguageModels", "ToolCaller"]


class LanguageModel(Protocol):
    """One language model, as ``ctx.generate`` uses it."""

    @property
    def name(self) -> str: ...

    def prompt_ids(self, prompt: str | Sequence[Mapping[str, object]]) -> Sequence[int]:
        """The prompt (raw text or chat messages) as token ids."""
        ...

    def complete(self, prompt_ids: Sequence[int], params: SamplingParams) -> AsyncIterable[str]:
        """The completion's text, piece by piece; an iterator with ``aclose`` is closed
        when the agent stops reading early."""
        ...


class LanguageModels(Protocol):
    """The language models of a node (``agentd.generate.GenerationService``)."""

    def get(self, name: str) -> LanguageModel:
        """The model called ``name``; NotFound when there is none."""
        ...

    def default(self) -> LanguageModel: ...


class ToolCaller(Protocol):
    """The sandboxed tools of a node (``agentd.tools.ToolService``)."""

    async def call(
        self, name: str, arguments: Mapping[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any: ...


class AgentHost(Protocol):
    """The calls a turn's context makes on its host. Each raises agentd errors
    (``agentd.errors``) for the caller's agent to see."""

    @property
    def generation(self) -> LanguageModels | None:
        """The node's language models (None: it has none)."""
        ...

    @property
    def tools(self) -> ToolCaller | None:
        """The node's tools (None: it has none)."""
        ...

    def infer_nowait(
        self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None
    ) -> Awaitable[dict[str, np.ndarray]]:
        """Queue an inference; the awaitable gives its outputs. Cancelling it withdraws
        the call if it has not run yet."""
        ...

    def tell_nowait(self, address: str | Address, message: Any) -> bool:
        """Deliver without waiting; False (nothing delivered) when there is no room now."""
        ...

    async def tell(
        self, address: str | Address, message: Any, *, timeout: float | None = None
    ) -> None:
        """Deliver, waiting for room for at most ``timeout``."""
        ...

    async def ask(
        self, address: str | Address, message: Any, *, timeout: float | None = None
    ) -> Any:
        """Deliver and await the other agent's reply, within ``timeout``."""
        ...
