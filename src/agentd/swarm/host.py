"""The swarm's actor host: the runtime's, plus a burst of tells in one pass."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agentd.agents.address import Address
from agentd.runtime import ActorHost
from agentd.runtime.activation import IDLE, SCHEDULED, Activation

__all__ = ["SwarmHost"]


class SwarmHost(ActorHost):
    """An :class:`ActorHost` that also takes many tells at once (``agentd swarm`` hands
    its start messages over 4,096 at a time).

    ``static_placement``: no agent moves between nodes while this host runs and every
    node opened the shared store before any of them wrote to it (``agentd swarm
    --processes N``: a fixed placement and a start barrier). Then a store that was empty
    when opened still holds nothing for this node's agents, so new activations skip the
    load, as with one process (a host with a forwarder otherwise loads every new
    activation: an agent that moved in may have a state written elsewhere), and the owner
    of an agent found elsewhere is looked up once.
    """

    def __init__(self, *args: Any, static_placement: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._static_placement = static_placement
        # Static placement: an agent another node owns stays there, so its lookup is kept
        # (the swarm's deciders send half a million reports to one remote shard each).
        self._remote: dict[str | Address, Address] = {}

    def _forwarded(self, address: str | Address) -> Address | None:
        if not self._static_placement:
            return super()._forwarded(address)
        remote = self._remote.get(address)
        if remote is None:
            remote = super()._forwarded(address)
            if remote is not None:
                self._remote[address] = remote
        return remote

    async def start(self) -> None:
        if not self._static_placement:
            await super().start()
            return
        # The base start marks the store "not empty" when there is a forwarder; keep what
        # the store found instead (see the class's docstring).
        forwarder, self.forwarder = self.forwarder, None
        try:
            await super().start()
        finally:
            self.forwarder = forwarder

    def tell_many_nowait(
        self,
        addresses: Sequence[str | Address],
        messages: Sequence[Any],
        start: int = 0,
        *,
        local: bool = False,
    ) -> int:
        """``tell_nowait(addresses[i], messages[i])`` for ``i`` from ``start`` on, in order,
        in one pass (a burst of tells, e.g. to many new agents); stops before the first
        message whose agent would need a place on a full run queue. Returns the index of
        the first message not delivered (``len(addresses)`` when all were). Raises as
        ``tell_nowait`` does; the messages before the failing one stay delivered.
        ``local``: the caller knows that this node owns every one of these agents (the
        swarm starts only its own deciders), so none is looked up for forwarding.
        """
        pool = self.pool
        room = pool.room()
        activations = self._activations
        limit = self._max_mailbox
        newly: list[Activation] = []  # idle agents that now have a message: to queue
        index, end = start, len(addresses)
        try:
            while index < end:
                address = addresses[index]
                activation = activations.get(address)  # type: ignore[arg-type]  # a str misses: parsed after
                if activation is None:
                    remote = None if local else self._forwarded(address)
                    if remote is not None:  # another process owns it: batched there
                        assert self.forwarder is not None
                        if not self.forwarder.tell_nowait(remote, messages[index]):
                            break
                        index += 1
                        continue
                    activation = self._activation_missed(address)
                if activation.phase is not IDLE:
                    activation.push(messages[index], limit)
                else:
                    # Idle, so nothing waits: the message takes the slot (or the empty deque).
                    if len(newly) == room:
                        break
                    if activation.mailbox is None:
                        activation.next_message = messages[index]
                    else:
                        activation.push(messages[index], limit)
                    activation.phase = SCHEDULED
                    newly.append(activation)
                self._waiting += 1
                index += 1
        finally:
            pool.submit_many_nowait(newly)  # fits: room was counted and nothing ran since
        return index
