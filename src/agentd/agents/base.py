"""The agent programming model: subclass :class:`Agent`, handle one message per turn."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, ClassVar

from agentd.agents.context import Context
from agentd.agents.message import Message

__all__ = ["Agent", "Context", "Reply"]

# What a turn may return: a Message, or plain text / bytes that become one. Agents talking
# to each other in-process (ctx.ask) may exchange any Python object.
Reply = Message | str | bytes


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
    # True for a type that keeps no state between turns (``ctx.state`` stays empty): in a
    # cluster every node runs it where the call arrives instead of forwarding the call to
    # the address's owner, so one address may be active on several nodes at once.
    stateless: ClassVar[bool] = False
    # Set on a type once the registry has replaced or removed it (a plugin reload): the
    # runtime then moves each of its instances to the current type before its next turn.
    _replaced: ClassVar[bool] = False

    async def handle(self, ctx: Context, message: Any) -> Any:
        raise NotImplementedError(f"agent type {self.name!r} does not handle messages")

    async def stream(self, ctx: Context, message: Any) -> AsyncIterator[Any]:
        """Stream a turn's events; by default one event, the reply of :meth:`handle`."""
        yield await self.handle(ctx, message)

    @classmethod
    def streams_natively(cls) -> bool:
        return cls.stream is not Agent.stream
