"""The runtime facade the gateway calls: ``invoke`` and ``stream`` on an address.

This first runtime keeps one agent instance per address (bounded, least recently used
instances are dropped) and runs one turn at a time per instance. The actor runtime replaces
the inside of this class; its methods are the contract the gateway relies on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from agentd.agents.address import Address, parse_address
from agentd.agents.base import Agent, Context, Reply
from agentd.agents.message import Message
from agentd.agents.registry import AgentRegistry
from agentd.errors import AgentdError, DeadlineExceeded, Internal

__all__ = ["AgentTypeInfo", "Runtime", "TurnObserver"]

log = logging.getLogger(__name__)


class TurnObserver(Protocol):
    """Told the outcome of each turn (the metrics layer implements it)."""

    def turn_finished(self, agent_type: str, outcome: str, seconds: float) -> None: ...


@dataclass(frozen=True, slots=True)
class AgentTypeInfo:
    name: str
    description: str
    streaming: bool
    active_instances: int


@dataclass(slots=True)
class _Instance:
    agent: Agent
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    state: dict[str, Any] = field(default_factory=dict)


class Runtime:
    """Routes messages to agent instances, creating them on first use."""

    def __init__(
        self,
        registry: AgentRegistry,
        *,
        max_instances: int = 100_000,
        observer: TurnObserver | None = None,
    ) -> None:
        self._registry = registry
        self._max_instances = max_instances
        self._observer = observer
        self._instances: OrderedDict[Address, _Instance] = OrderedDict()

    def list_types(self) -> list[AgentTypeInfo]:
        counts: dict[str, int] = {}
        for address in self._instances:
            counts[address.type] = counts.get(address.type, 0) + 1
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
        """Run one turn and return the handling address and the reply.

        Raises NotFound (unknown type), InvalidArgument (malformed address),
        DeadlineExceeded (the turn is cancelled at the deadline) or Internal (the agent raised).
        """
        addr, instance = self._instance(address)
        started = time.perf_counter()
        outcome = "error"
        try:
            async with asyncio.timeout(timeout):
                async with instance.lock:
                    ctx = self._context(addr, instance, timeout)
                    reply = _to_message(await instance.agent.handle(ctx, message))
            outcome = "ok"
            return addr, reply
        except TimeoutError:
            outcome = "deadline"
            raise DeadlineExceeded(f"agent {addr} did not answer within {timeout:.3f}s") from None
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except AgentdError:
            raise
        except Exception as exc:
            log.exception("agent %s raised", addr)
            raise Internal(f"agent {addr} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            self._observe(addr.type, outcome, started)

    async def stream(
        self, address: str | Address, message: Message, *, timeout: float | None = None
    ) -> AsyncIterator[tuple[Address, Message | str]]:
        """Run one streaming turn, yielding ``(address, event)`` pairs.

        The deadline covers the whole stream; when it passes, the agent's generator is
        closed and DeadlineExceeded is raised.
        """
        addr, instance = self._instance(address)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        started = time.perf_counter()
        outcome = "error"
        try:
            async with asyncio.timeout_at(deadline):
                await instance.lock.acquire()
            try:
                events = instance.agent.stream(self._context(addr, instance, timeout), message)
                try:
                    while True:
                        async with asyncio.timeout_at(deadline):
                            try:
                                event = await anext(events)
                            except StopAsyncIteration:
                                break
                        yield addr, _to_event(event)
                finally:
                    await events.aclose()
            finally:
                instance.lock.release()
            outcome = "ok"
        except TimeoutError:
            outcome = "deadline"
            raise DeadlineExceeded(f"agent {addr} did not finish within {timeout:.3f}s") from None
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        except AgentdError:
            raise
        except Exception as exc:
            log.exception("agent %s raised", addr)
            raise Internal(f"agent {addr} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            self._observe(addr.type, outcome, started)

    async def aclose(self) -> None:
        self._instances.clear()

    def _instance(self, address: str | Address) -> tuple[Address, _Instance]:
        addr = parse_address(address) if isinstance(address, str) else address
        instance = self._instances.get(addr)
        if instance is not None:
            self._instances.move_to_end(addr)
            return addr, instance
        instance = _Instance(self._registry.get(addr.type)())
        self._instances[addr] = instance
        if len(self._instances) > self._max_instances:
            self._evict_one()
        return addr, instance

    def _evict_one(self) -> None:
        for addr, instance in self._instances.items():
            if not instance.lock.locked():
                del self._instances[addr]
                return

    @staticmethod
    def _context(addr: Address, instance: _Instance, timeout: float | None) -> Context:
        deadline = None if timeout is None else time.monotonic() + timeout
        return Context(addr, instance.state, deadline)

    def _observe(self, agent_type: str, outcome: str, started: float) -> None:
        if self._observer is not None:
            self._observer.turn_finished(agent_type, outcome, time.perf_counter() - started)


def _to_message(reply: Reply) -> Message:
    if isinstance(reply, Message):
        return reply
    if isinstance(reply, str):
        return Message(text=reply)
    if isinstance(reply, bytes | bytearray | memoryview):
        return Message(data=bytes(reply))
    raise Internal(f"agent returned {type(reply).__name__}; expected Message, str or bytes")


def _to_event(event: Reply) -> Message | str:
    return event if isinstance(event, str) else _to_message(event)
