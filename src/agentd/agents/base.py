"""The agent programming model: subclass :class:`Agent`, handle one message per turn."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, ClassVar

from agentd.agents.address import Address
from agentd.agents.message import Message

__all__ = ["Agent", "Context", "Reply"]

# What a turn may return: a Message, or plain text / bytes that become one.
Reply = Message | str | bytes


class Context:
    """What a turn can see and use. One per turn; not shared between turns."""

    __slots__ = ("address", "deadline", "state")

    def __init__(self, address: Address, state: dict[str, Any], deadline: float | None) -> None:
        self.address = address
        # Per-instance state; the actor runtime persists it between turns.
        self.state = state
        # Absolute time.monotonic() deadline of this turn, or None.
        self.deadline = deadline

    def time_left(self) -> float | None:
        """Seconds until the turn's deadline, or None without one."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())


class Agent:
    """Base class of agent types.

    Set ``name`` (the address type) and override :meth:`handle`. Override :meth:`stream` to
    send several events per turn (tokens, progress). An instance handles one message at a
    time, so user code needs no locks.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    async def handle(self, ctx: Context, message: Message) -> Reply:
        raise NotImplementedError(f"agent type {self.name!r} does not handle messages")

    async def stream(self, ctx: Context, message: Message) -> AsyncIterator[Reply]:
        """Stream a turn's events; by default one event, the reply of :meth:`handle`."""
        yield await self.handle(ctx, message)

    @classmethod
    def streams_natively(cls) -> bool:
        return cls.stream is not Agent.stream
