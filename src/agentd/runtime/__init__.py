"""Runtime: virtual actors run by a worker pool, with persisted state."""

from agentd.runtime.facade import AgentTypeInfo, Runtime
from agentd.runtime.host import ActorHost, TurnObserver
from agentd.runtime.pool import PoolStats, WorkerPool
from agentd.runtime.state import MemoryStateStore, SQLiteStateStore, StateStore

__all__ = [
    "ActorHost",
    "AgentTypeInfo",
    "MemoryStateStore",
    "PoolStats",
    "Runtime",
    "SQLiteStateStore",
    "StateStore",
    "TurnObserver",
    "WorkerPool",
]
