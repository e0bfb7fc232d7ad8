"""The runtime's Forwarder for a cluster: placement says which node owns an agent, a peer
client carries the call there in one hop (docs/cluster.md, Forwarding).

Retry rule: a forwarded ask or stream that never left this node (the connection to the
owner could not be opened: :class:`NotSent`) is tried again, the owner looked up afresh
each time, with a growing pause (50 ms to 0.5 s), until it is delivered, its deadline is
near, or ``RETRY_WINDOW`` has passed: a local process that restarts (about 1.5 s) or a
dead node whose partitions are taken over (the lease TTL + 1 s) costs its callers time,
not an error. A call already written to the owner's socket is never retried, because the
owner may have run its turn: its caller gets UNAVAILABLE ("node X is unreachable;
retry") and decides. Tells are not retried either: the few in a buffer when a connection
is lost are counted and logged as lost (``PeerClient.tells_lost``).
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from agentd.agents.address import Address
from agentd.cluster.peer import NotSent, PeerClient, parse_endpoint
from agentd.cluster.placement import Placement
from agentd.errors import AgentdError
from agentd.observability.cluster_metrics import NO_METRICS, ClusterObserver

__all__ = ["ClusterForwarder"]

RETRY_PAUSE = 0.05  # the first pause before a call that never left is tried again
RETRY_PAUSE_MAX = 0.5
RETRY_WINDOW = 10.0  # how long a call that never left keeps trying (within its deadline)


class ClusterForwarder:
    """Forwards calls for agents ``node_id`` does not own to their owners.

    ``placement`` None: no placement known yet (every call to another node fails with
    UNAVAILABLE). ``endpoints``: each node's peer endpoint. :meth:`update` replaces them
    (etcd membership calls it on every change)."""

    def __init__(
        self,
        node_id: str,
        placement: Placement | None,
        endpoints: Mapping[str, str],
        observer: ClusterObserver = NO_METRICS,
    ) -> None:
        self.node_id = node_id
        self._observer = observer
        self._clients: dict[str, PeerClient] = {}
        self.placement: Placement | None = None
        self.endpoints: dict[str, str] = {}
        self._owners: tuple[str, ...] = ()
        self._mine: tuple[bool, ...] = ()
        self._closed_clients: list[PeerClient] = []
        self._closing: set[asyncio.Task[None]] = set()
        # This node's own peer endpoint, once its server listens (for etcd membership).
        self.local_endpoint: str | None = None
        self.update(placement=placement, endpoints=endpoints)

    def update(
        self, *, placement: Placement | None = None, endpoints: Mapping[str, str] | None = None
    ) -> None:
        """Swap in a newer placement and/or endpoints (one assignment each: a call sees
        the old or the new, never a mix). A node whose endpoint changed or went away gets
        a new client; the old one is closed."""
        if endpoints is not None:
            for endpoint in endpoints.values():
                parse_endpoint(endpoint)  # ConfigError before anything changes
            for node, client in list(self._clients.items()):
                if endpoints.get(node) != client.endpoint:
                    del self._clients[node]
                    self._closed_clients.append(client)
            self.endpoints = dict(endpoints)
        if placement is not None:
            # A precomputed "mine" per partition: owns() is one CRC and one index.
            owners = placement.owners
            self._mine = tuple(owner == self.node_id for owner in owners)
            self._owners = owners
            self.placement = placement
        if self._closed_clients:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            closing, self._closed_clients = self._closed_clients, []
            for client in closing:
                task = loop.create_task(client.aclose())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    # -- the runtime's Forwarder protocol ------------------------------------------------

    def owns(self, address: Address) -> bool:
        mine = self._mine
        if not mine:
            return False
        # partition_of, inline: this runs for every message to an agent not active here.
        return mine[zlib.crc32((address.type + "/" + address.id).encode()) % len(mine)]

    def owner(self, address: Address) -> str:
        owners = self._owners
        if not owners:
            raise NotSent(f"agent {address}: this node knows no placement yet; retry")
        return owners[zlib.crc32((address.type + "/" + address.id).encode()) % len(owners)]

    def client(self, node: str) -> PeerClient:
        """The peer client of ``node``; Unavailable when its endpoint is unknown."""
        client = self._clients.get(node)
        if client is None:
            endpoint = self.endpoints.get(node)
            if endpoint is None:
                # Not delivered (an unowned partition, a node not yet seen): retried.
                raise NotSent(f"node {node or '(none)'} has no known address; retry")
            client = self._clients[node] = PeerClient(node, endpoint, observer=self._observer)
        return client

    def _client_of(self, address: Address) -> PeerClient:
        return self.client(self.owner(address))

    def tell_nowait(self, address: Address, message: Any, context: object = None) -> bool:
        return self._client_of(address).tell_nowait(address, message, context)

    async def wait_for_room(self, address: Address) -> None:
        await self._client_of(address).wait_for_room()

    async def ask(self, address: Address, message: Any, timeout: float | None) -> Any:
        started = time.perf_counter()
        outcome = "ok"
        try:
            pause = 0.0
            while True:
                left = _left(timeout, started)
                try:
                    return await self._client_of(address).ask(
                        address, message, left, fresh=pause > 0
                    )
                except NotSent as exc:
                    # Never delivered: the owner may be restarting or moving; try again.
                    pause = await _pause_before_retry(pause, started, left, exc)
        except AgentdError as exc:
            outcome = exc.code.name
            raise
        except asyncio.CancelledError:
            outcome = "CANCELLED"
            raise
        finally:
            self._observer.forwarded("ask", outcome, time.perf_counter() - started)

    async def ask_stream(
        self, address: Address, message: Any, timeout: float | None
    ) -> AsyncGenerator[Any, None]:
        started = time.perf_counter()
        outcome = "ok"
        stream = None
        try:
            pause = 0.0
            while True:
                left = _left(timeout, started)
                try:
                    stream = self._client_of(address).ask_stream(
                        address, message, left, fresh=pause > 0
                    )
                    first = await anext(stream, _NOTHING)
                    break
                except NotSent as exc:
                    pause = await _pause_before_retry(pause, started, left, exc)
            if first is _NOTHING:
                return
            yield first
            async for event in stream:
                yield event
        except AgentdError as exc:
            outcome = exc.code.name
            raise
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "CANCELLED"
            raise
        finally:
            if stream is not None:
                await stream.aclose()
            self._observer.forwarded("stream", outcome, time.perf_counter() - started)

    async def aclose(self) -> None:
        """Close every peer client (calls in progress fail with Unavailable)."""
        clients = [*self._clients.values(), *self._closed_clients]
        self._clients.clear()
        self._closed_clients = []
        for client in clients:
            await client.aclose()


_NOTHING = object()


def _left(timeout: float | None, started: float) -> float | None:
    """What is left of ``timeout`` (seconds, from ``started`` on perf_counter)."""
    if timeout is None:
        return None
    return max(1e-6, timeout - (time.perf_counter() - started))


async def _pause_before_retry(
    pause: float, started: float, left: float | None, error: NotSent
) -> float:
    """Sleep before a call that never left is tried again and return the pause taken;
    raise its ``error`` when the call's time (``left``) or the retry window would run out
    first."""
    pause = min(RETRY_PAUSE_MAX, pause * 2) if pause else RETRY_PAUSE
    if (left is not None and left <= pause) or (
        time.perf_counter() - started + pause > RETRY_WINDOW
    ):
        raise error
    await asyncio.sleep(pause)
    return pause
