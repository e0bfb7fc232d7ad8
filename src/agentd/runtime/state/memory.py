"""A state store in a dict: for tests and runs that need no persistence."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agentd.runtime.state import CommitFailed

__all__ = ["MemoryStateStore"]


class MemoryStateStore:
    """Keeps snapshots in a dict: for tests and for runs that need no persistence."""

    def __init__(self) -> None:
        self.snapshots: dict[str, bytes] = {}
        self.writes = 0
        self.errors = 0
        # Each save commits alone: the batch size a ``state.commit`` span reports.
        self.last_commit_size = 1
        self.empty_at_open = True
        self.on_commit_failed: CommitFailed | None = None

    async def open(self) -> None:
        self.empty_at_open = not self.snapshots

    async def load(self, address: str) -> bytes | None:
        return self.snapshots.get(address)

    def save(self, address: str, snapshot: bytes) -> asyncio.Future[None]:
        self.snapshots[address] = snapshot
        self.writes += 1
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    def save_nowait(self, address: str, snapshot: bytes) -> None:
        self.snapshots[address] = snapshot
        self.writes += 1

    def failing(self) -> str | None:
        return None

    async def flush(self) -> None:
        pass  # every write is done when made

    async def aclose(self) -> None:
        pass
