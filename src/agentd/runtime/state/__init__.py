"""Agent state stores: the interface the actor host uses, and its implementations.

A store keeps one serialized snapshot (bytes) per agent address (``type/id``). The host
reads an agent's snapshot before its first turn (``load``), queues a new one after each
turn that changed the state (``save`` when a caller waits for it to be durable,
``save_nowait`` otherwise) and never reads its own writes back while the agent stays
active. Implementations: :class:`SQLiteStateStore` (``state.sqlite``, the default: embedded,
durable, group commit; shared by the processes of one machine), :class:`RedisStateStore`
(``state.redis``: shared by the nodes of a cluster, versioned writes; imported on first use,
redis-py being the optional ``cluster`` extra) and :class:`MemoryStateStore`
(``state.memory``: tests and runs without persistence). A new backend implements
:class:`StateStore` and keeps its rules:

* Writes may be grouped (one transaction for many saves), but a group commits all or
  nothing. When it fails, the store drops the saves still queued for the same agents
  (they were made on top of the state that failed), fails their ``save`` futures with the
  error, counts it in ``errors``, and calls ``on_commit_failed(keys, error)`` so that the
  host rolls those agents back to what the store holds.
* Refinement for a store with versioned writes (Redis): a write refused because another
  node wrote that agent since this store read it (a stale owner: fencing) fails only that
  agent's saves, with Unavailable ("... written by another node; retry"), and reports it
  to ``on_commit_failed``; the other writes of the group commit. ``load`` remembers the
  version it read, and a save carries it.
* ``failing()`` says why the store is unhealthy (readiness shows it) while commits keep
  failing, and None again once one succeeds (or after a quiet while).
* ``empty_at_open`` is True when the store held nothing when opened: the host then skips
  loads for agents it never passivated.
* ``flush`` waits until what is queued is committed (an agent handed to another node);
  ``aclose`` commits what is queued, then releases the store.
* Stores shared by several nodes (SQLite among the processes of one machine, Redis among
  machines) may hold states this node never wrote: the host loads every activation then.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Protocol

from agentd.runtime.state.memory import MemoryStateStore
from agentd.runtime.state.sqlite import SQLiteStateStore

if TYPE_CHECKING:  # at run time, ``__getattr__`` below imports it on first use
    from agentd.runtime.state.redis import RedisStateStore

__all__ = ["CommitFailed", "MemoryStateStore", "RedisStateStore", "SQLiteStateStore", "StateStore"]


def __getattr__(name: str) -> object:
    # Imported on first use: redis-py is optional (the cluster extra) and costs ~0.25 s.
    if name == "RedisStateStore":
        from agentd.runtime.state.redis import RedisStateStore

        return RedisStateStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Called with the keys of the agents whose saves failed (after their waiters failed).
CommitFailed = Callable[[Collection[str], BaseException], None]


class StateStore(Protocol):
    """Where agents' states live between turns (see the module doc for the rules)."""

    # True when the store held no state when opened: then only what this process saved
    # can be loaded, and the host skips loads for agents it never passivated.
    empty_at_open: bool
    # Set by the host before ``open``: told which agents' saves failed to commit.
    on_commit_failed: CommitFailed | None
    errors: int  # commits that failed so far

    async def open(self) -> None:
        """Connect / create what the store needs; sets ``empty_at_open``."""
        ...

    async def load(self, address: str) -> bytes | None:
        """The last committed snapshot of ``address``, or None when it has none. Raises
        (any exception) when it cannot be read: the host fails that agent's call with
        UNAVAILABLE."""
        ...

    def save(self, address: str, snapshot: bytes) -> asyncio.Future[None]:
        """Queue a write; the future is done once it is committed (or failed with the
        commit's error)."""
        ...

    def save_nowait(self, address: str, snapshot: bytes) -> None:
        """Queue a write nobody waits for (a failed commit is reported to
        ``on_commit_failed``)."""
        ...

    def failing(self) -> str | None:
        """Why the store is failing (recent commits failed and none succeeded since), or
        None while it is healthy."""
        ...

    async def flush(self) -> None:
        """Return once every write queued so far is committed (or failed): an agent
        handed to another node is read there only after this."""
        ...

    async def aclose(self) -> None:
        """Commit what is queued, then release the store."""
        ...
