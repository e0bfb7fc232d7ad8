"""Agent state stores. A store keeps one serialized snapshot per agent address.

``save`` returns once the snapshot is committed; many concurrent saves share one
transaction (group commit), so durability does not cost a disk sync per turn. ``load``
calls are grouped the same way. SQLite in WAL mode is the default: embedded, no server,
and a committed transaction survives the process being killed.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from pathlib import Path
from typing import Protocol, TypeVar

__all__ = ["MemoryStateStore", "SQLiteStateStore", "StateStore"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class StateStore(Protocol):
    # True when the store held no state when opened: then only what this process saved
    # can be loaded, and the host skips loads for agents it never passivated.
    empty_at_open: bool

    async def open(self) -> None: ...

    async def load(self, address: str) -> bytes | None: ...

    def save(self, address: str, snapshot: bytes) -> asyncio.Future[None]:
        """Queue a write; the future is done once it is committed."""
        ...

    def save_nowait(self, address: str, snapshot: bytes) -> None:
        """Queue a write nobody waits for."""
        ...

    async def aclose(self) -> None: ...


class MemoryStateStore:
    """Keeps snapshots in a dict: for tests and for runs that need no persistence."""

    def __init__(self) -> None:
        self.snapshots: dict[str, bytes] = {}
        self.writes = 0
        self.empty_at_open = True

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

    async def aclose(self) -> None:
        pass


@functools.lru_cache(maxsize=8)
def _upsert_sql(rows: int) -> str:
    return (
        "INSERT INTO agent_state (address, state) VALUES "
        + ",".join(["(?,?)"] * rows)
        + " ON CONFLICT(address) DO UPDATE SET state = excluded.state"
    )


class _Grouped:
    """Group commit: calls arriving while a batch runs wait and go together in the next one.

    ``flush(items)`` starts one batch and returns a future that is done when it is.
    """

    def __init__(self, flush: Callable[[list], asyncio.Future]) -> None:
        self.items: list = []
        self._flush = flush
        self._scheduled = False
        self._running: asyncio.Future | None = None

    def add(self, item: object) -> None:
        self.items.append(item)
        if not self._scheduled and self._running is None:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._run)

    def add_pair(self, first: object, second: object) -> None:
        """``add`` for groups kept flat (two list entries per item, no tuple)."""
        items = self.items
        items.append(first)
        items.append(second)
        if not self._scheduled and self._running is None:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._run)

    async def drain(self) -> None:
        """Wait until every item added so far is flushed."""
        while self.items or self._running is not None or self._scheduled:
            if self._running is not None:
                await asyncio.wait([self._running])
            await asyncio.sleep(0)

    def _run(self, _done: object = None) -> None:
        self._scheduled = False
        self._running = None
        if not self.items:
            return
        items, self.items = self.items, []
        self._running = self._flush(items)
        self._running.add_done_callback(self._run)


class SQLiteStateStore:
    """Snapshots in one SQLite table; every statement runs on one dedicated thread."""

    _CHUNK = 500  # keys per SELECT ... IN (...)
    _ROWS_PER_INSERT = 400  # 800 parameters: under every SQLite build's variable limit

    def __init__(self, path: Path | str) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state-store")
        self._db: sqlite3.Connection | None = None
        self._saves = _Grouped(self._flush_saves)  # flat: address, snapshot, address, ...
        self._save_waiters: list[asyncio.Future[None]] = []
        self._loads = _Grouped(self._flush_loads)
        self.writes = 0
        self.commits = 0
        self.empty_at_open = False

    async def open(self) -> None:
        await self._call(self._open)

    def _open(self) -> None:
        db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a killed process (not a power cut).
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS agent_state (address TEXT PRIMARY KEY, state BLOB)"
            " WITHOUT ROWID"
        )
        self.empty_at_open = db.execute("SELECT 1 FROM agent_state LIMIT 1").fetchone() is None
        self._db = db

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def load(self, address: str) -> bytes | None:
        future: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self._loads.add((address, future))
        return await future

    def save(self, address: str, snapshot: bytes) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._save_waiters.append(future)
        self._saves.add_pair(address, snapshot)
        return future

    def save_nowait(self, address: str, snapshot: bytes) -> None:
        """Queue a write nobody waits for (a failed commit is logged)."""
        self._saves.add_pair(address, snapshot)

    def _flush_loads(self, items: list) -> asyncio.Future:
        return self._submit(self._select, [a for a, _ in items], [f for _, f in items], items)

    def _flush_saves(self, items: list) -> asyncio.Future:
        # ``items`` is flat (address, snapshot, address, ...); the waiters of this group
        # are those of ``save`` calls since the last flush.
        waiting, self._save_waiters = self._save_waiters, []
        return self._submit(self._upsert, items, waiting, None)

    def _submit(self, fn: Callable, arg: list, futures: list, items: list | None) -> asyncio.Future:
        task = asyncio.ensure_future(self._call(fn, arg))

        def done(t: asyncio.Future) -> None:
            if t.cancelled():
                error: BaseException | None = asyncio.CancelledError()
            else:
                error = t.exception()
            if error is not None:
                log.error("state store %s failed: %s", fn.__name__, error)
                for f in futures:
                    if not f.done():
                        f.set_exception(error)
                return
            result = t.result()
            for i, f in enumerate(futures):
                if not f.done():
                    f.set_result(result.get(items[i][0]) if items is not None else None)

        task.add_done_callback(done)
        return task

    def _upsert(self, flat: list) -> None:
        """Write a group: ``flat`` is address, snapshot, address, snapshot, ..."""
        assert self._db is not None
        rows = dict(zip(flat[0::2], flat[1::2], strict=True))  # an address's last write wins
        if 2 * len(rows) != len(flat):
            flat = list(chain.from_iterable(rows.items()))
        step = 2 * self._ROWS_PER_INSERT
        with self._db:  # one transaction for the whole group
            self._db.execute("BEGIN")
            # Many rows per statement: executemany would release and retake the GIL for
            # every row, and each retake can wait out the event loop thread's switch
            # interval.
            for start in range(0, len(flat), step):
                chunk = flat[start : start + step]
                self._db.execute(_upsert_sql(len(chunk) // 2), chunk)
        self.writes += len(rows)
        self.commits += 1

    def _select(self, addresses: list[str]) -> dict[str, bytes]:
        assert self._db is not None
        found: dict[str, bytes] = {}
        unique = list(dict.fromkeys(addresses))
        for start in range(0, len(unique), self._CHUNK):
            chunk = unique[start : start + self._CHUNK]
            marks = ",".join("?" * len(chunk))
            found.update(
                self._db.execute(
                    f"SELECT address, state FROM agent_state WHERE address IN ({marks})", chunk
                )
            )
        return found

    async def aclose(self) -> None:
        await self._saves.drain()
        await self._loads.drain()
        if self._db is not None:
            await self._call(self._db.close)
            self._db = None
        self._thread.shutdown(wait=True)
