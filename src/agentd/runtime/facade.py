"""The runtime facade the gateway calls: ``invoke`` and ``stream`` on an address.

Behind it: virtual actors (``host.py``: the directory and delivery; ``activation.py``: one
live instance and its turns; ``mailbox.py``: its waiting messages) run by a fixed worker
pool (``pool.py``) with state in a store (``state/``). The gateway sees only these methods.

Deadlines: ``timeout`` is the caller's (seconds), None when it gave none; the actor host
applies the node's deadline rule (``agentd.deadlines``: the configured default for None,
never past the maximum, DEADLINE_EXCEEDED for a time already up), for asks, streams and
tells alike, and gives told turns the default from their start.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass

from agentd.agents.address import Address, parse_address
from agentd.agents.message import Message
from agentd.agents.registry import AgentRegistry
from agentd.errors import Internal
from agentd.runtime.host import ActorHost

__all__ = ["AgentTypeInfo", "Runtime"]


@dataclass(frozen=True, slots=True)
class AgentTypeInfo:
    name: str
    description: str
    streaming: bool
    active_instances: int


class Runtime:
    """Routes messages to agent instances, activating them on first use."""

    def __init__(self, host: ActorHost, *, close_timeout_s: float = 1.0) -> None:
        self.host = host
        self._registry: AgentRegistry = host.registry
        # By the time the runtime closes, the server has already drained requests for its
        # grace period; turns still running get this long before they are cancelled.
        self._close_timeout_s = close_timeout_s

    async def start(self) -> None:
        await self.host.start()

    async def aclose(self) -> None:
        await self.host.aclose(grace=self._close_timeout_s)

    def not_ready_reason(self) -> str | None:
        """Why the runtime cannot serve now (its state store is failing), or None."""
        return self.host.store_failing()

    def list_types(self) -> list[AgentTypeInfo]:
        counts = self.host.active_counts()
        infos = []
        for name in self._registry.names():
            cls = self._registry.get(name)
            infos.append(
                AgentTypeInfo(name, cls.description, cls.streams_natively(), counts.get(name, 0))
            )
        return infos

    async def invoke(
        self, address: str | Address, message: Message, *, timeout: float | None = None
    ) -> tuple[Address, Message]:
        """Run one turn and return the handling address and the reply, within ``timeout``
        (the caller's; None: the node's default deadline).

        Raises NotFound (unknown type), InvalidArgument (malformed address),
        ResourceExhausted (run queue full), DeadlineExceeded (the turn is cancelled at the
        deadline) or Internal (the agent raised).
        """
        addr = parse_address(address) if isinstance(address, str) else address
        reply = await self.host.ask(addr, message, timeout=timeout)
        return addr, _to_message(reply)

    async def stream(
        self, address: str | Address, message: Message, *, timeout: float | None = None
    ) -> AsyncGenerator[tuple[Address, Message | str], None]:
        """Run one streaming turn, yielding ``(address, event)`` pairs, within ``timeout``
        (the caller's; None: the node's default deadline)."""
        addr = parse_address(address) if isinstance(address, str) else address
        events = self.host.ask_stream(addr, message, timeout=timeout)
        try:
            async for event in events:
                yield addr, event if isinstance(event, str) else _to_message(event)
        finally:
            await events.aclose()


def _to_message(reply: object) -> Message:
    if isinstance(reply, Message):
        return reply
    if isinstance(reply, str):
        return Message(text=reply)
    if isinstance(reply, bytes | bytearray | memoryview):
        return Message(data=bytes(reply))
    raise Internal(f"agent returned {type(reply).__name__}; expected Message, str or bytes")
