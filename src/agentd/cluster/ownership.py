"""Partition ownership: which node should own each partition (a pure plan), and the gate a
node puts in front of its forwarder while partitions move (hand-over, lease loss).

The plan is a function of the partition count and the set of eligible nodes (live, in a
zone not marked down) only, so every node that sees the same membership computes the
same plan, and a node restarted with the same id gets the same partitions back. Each
partition ranks the nodes by a hash of (node, partition) (rendezvous hashing: a joining
node takes partitions from every other node, a leaving node's partitions spread over
all); partitions are dealt in order to their best-ranked node that still has room (the
``partitions % nodes`` first nodes by id take one more than the others), so shares
differ by at most one. A node acts only on its own part of the plan: it claims free
partitions planned for it, and hands away partitions it owns that are planned for
another node.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
import zlib
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agentd.agents.address import Address
from agentd.cluster.placement import partition_of
from agentd.errors import DeadlineExceeded, Unavailable
from agentd.observability import trace_wire
from agentd.runtime.host import ActorHost, Forwarder

__all__ = ["UNOWNED", "OwnershipGate", "Plan", "plan_for", "plan_owners"]

UNOWNED = ""

_log = logging.getLogger(__name__)

# Tells held for one draining partition before senders are made to wait (bounded queue).
MAX_HELD_TELLS = 100_000


def _order(partition: int, node: str) -> tuple[int, str]:
    # Rendezvous hashing: the highest hash of (partition, node) first; ties by id.
    return -zlib.crc32(f"{partition}@{node}".encode()), node


def plan_owners(partitions: int, nodes: Iterable[str]) -> list[str]:
    """The owner every partition should have when ``nodes`` are the eligible nodes
    (UNOWNED everywhere when there are none)."""
    eligible = sorted(set(nodes))
    if not eligible:
        return [UNOWNED] * partitions
    share, extra = divmod(partitions, len(eligible))
    room = {node: share + (i < extra) for i, node in enumerate(eligible)}
    owners: list[str] = []
    for p in range(partitions):
        for node in sorted(eligible, key=functools.partial(_order, p)):
            if room[node]:
                room[node] -= 1
                owners.append(node)
                break
    return owners


@dataclass(frozen=True, slots=True)
class Plan:
    """What one node should do now: partitions to claim (free, planned for it) and
    partitions to hand away (owned by it, planned for another node), by receiver."""

    claim: list[int] = field(default_factory=list)
    hand_over: dict[str, list[int]] = field(default_factory=dict)

    @property
    def idle(self) -> bool:
        return not self.claim and not self.hand_over


def plan_for(me: str, owners: Sequence[str], desired: Sequence[str]) -> Plan:
    """Node ``me``'s part of moving from ``owners`` (current, UNOWNED for free) to
    ``desired`` (from :func:`plan_owners`). A partition desired by nobody (no eligible
    node) stays where it is."""
    claim: list[int] = []
    hand_over: dict[str, list[int]] = {}
    for p, (owner, want) in enumerate(zip(owners, desired, strict=True)):
        if want == UNOWNED or owner == want:
            continue
        if want == me and owner == UNOWNED:
            claim.append(p)
        elif owner == me:
            hand_over.setdefault(want, []).append(p)
    return Plan(claim, hand_over)


class OwnershipGate:
    """The node's forwarder as its host sees it: the cluster forwarder behind a gate that
    (1) holds calls for partitions being handed away until the hand-over ends, then
    routes them again (to the new owner, or here if it failed), and (2) answers nothing as
    owner once the node's lease may have lapsed (``valid_until`` on the monotonic clock,
    or :meth:`fence`): callers then get Unavailable with a retry hint.

    Owns the held calls (answered when their hold ends or their deadline passes) and the
    task that redelivers held tells.
    """

    def __init__(
        self,
        inner: Forwarder,
        host: ActorHost,
        *,
        node_id: str,
        partitions: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = inner
        self._host = host
        self._node_id = node_id
        self._partitions = partitions
        self._clock = clock
        self._held: dict[int, asyncio.Future[None]] = {}
        # address, message, the sender's trace context (or None), in order.
        self._held_tells: dict[int, list[tuple[Address, Any, object]]] = {}
        self._fenced = False
        self.valid_until = math.inf  # the lease may have lapsed from then on
        self._redelivery: set[asyncio.Task[None]] = set()

    # -- control (the membership) -------------------------------------------------------

    @property
    def fenced(self) -> bool:
        return self._fenced or self._clock() >= self.valid_until

    def fence(self) -> None:
        self._fenced = True

    def unfence(self) -> None:
        self._fenced = False

    def hold(self, partitions: Iterable[int]) -> None:
        loop = asyncio.get_running_loop()
        for p in partitions:
            if p not in self._held:
                self._held[p] = loop.create_future()
                self._held_tells[p] = []

    def unhold(self, partitions: Iterable[int]) -> None:
        """End the hold: waiting calls route again; held tells are redelivered in order."""
        tells: list[tuple[Address, Any, object]] = []
        for p in partitions:
            future = self._held.pop(p, None)
            if future is not None and not future.done():
                future.set_result(None)
            tells.extend(self._held_tells.pop(p, ()))
        if tells:
            task = asyncio.get_running_loop().create_task(self._redeliver(tells))
            self._redelivery.add(task)
            task.add_done_callback(self._redelivery.discard)

    async def _redeliver(self, tells: list[tuple[Address, Any, object]]) -> None:
        for address, message, context in tells:
            # Told under its sender's context: its turn stays in the sender's trace.
            token = trace_wire.attach(context) if context is not None else None
            try:
                await self._host.tell(address, message)
            except Exception as error:  # a told message has nobody to tell: log it
                _log.warning("a tell to %s held during a hand-over was lost: %s", address, error)
            finally:
                if token is not None:
                    trace_wire.detach(token)

    async def aclose(self) -> None:
        self.unhold(list(self._held))
        for task in list(self._redelivery):
            task.cancel()
        if self._redelivery:
            await asyncio.wait(self._redelivery)

    # -- the runtime's Forwarder protocol -----------------------------------------------

    def owns(self, address: Address) -> bool:
        if self._held and partition_of(address, self._partitions) in self._held:
            return False
        if not self.inner.owns(address):
            return False
        # Owned as far as etcd last said: only while the lease is surely still ours.
        return not self.fenced

    def _refuse_if_fenced(self, address: Address) -> None:
        if self.fenced and self.inner.owns(address):
            raise Unavailable(
                f"node {self._node_id} no longer owns {address.type}/{address.id} "
                "(its etcd lease may have lapsed); retry"
            )

    def tell_nowait(self, address: Address, message: Any, context: object = None) -> bool:
        p = partition_of(address, self._partitions)
        if p in self._held:
            held = self._held_tells[p]
            if len(held) >= MAX_HELD_TELLS:
                return False
            held.append((address, message, context))
            return True
        self._refuse_if_fenced(address)
        return self.inner.tell_nowait(address, message, context)

    async def wait_for_room(self, address: Address) -> None:
        future = self._held.get(partition_of(address, self._partitions))
        if future is not None:
            await asyncio.shield(future)
            return
        await self.inner.wait_for_room(address)

    async def _wait_held(self, address: Address, timeout: float | None) -> float | None:
        """Wait out the hold of ``address``'s partition; the time left of ``timeout``."""
        future = self._held.get(partition_of(address, self._partitions))
        if future is None:
            return timeout
        started = self._clock()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(future)
        except TimeoutError:
            raise DeadlineExceeded(
                f"{address.type}/{address.id} was moving to another node past the deadline"
            ) from None
        return None if timeout is None else max(0.0, timeout - (self._clock() - started))

    async def ask(self, address: Address, message: Any, timeout: float | None) -> Any:
        if self._held and partition_of(address, self._partitions) in self._held:
            left = await self._wait_held(address, timeout)
            return await self._host.ask(address, message, timeout=left)
        self._refuse_if_fenced(address)
        return await self.inner.ask(address, message, timeout)

    async def ask_stream(
        self, address: Address, message: Any, timeout: float | None
    ) -> AsyncGenerator[Any, None]:
        if self._held and partition_of(address, self._partitions) in self._held:
            left = await self._wait_held(address, timeout)
            stream = self._host.ask_stream(address, message, timeout=left)
        else:
            self._refuse_if_fenced(address)
            stream = self.inner.ask_stream(address, message, timeout)
        try:
            async for event in stream:
                yield event
        finally:
            await stream.aclose()
