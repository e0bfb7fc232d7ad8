"""Agent state in SQLite: one table, one dedicated thread for every statement.

Several processes of one machine may share the file (``serve --processes N``): WAL lets
them read while one writes, and a writer waits up to a minute for another's transaction.
``save`` returns once the snapshot is committed; many concurrent saves share one
transaction (group commit), so durability does not cost a disk sync per turn. ``load``
calls are grouped the same way. WAL mode: embedded, no server, and a committed transaction
survives the process being killed. A failed group is handled as ``agentd.runtime.state``
describes (all or nothing, queued saves of its agents dropped, ``on_commit_failed``).
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
from typing import TYPE_CHECKING, TypeVar

from agentd.runtime.state.health import StoreHealth

if TYPE_CHECKING:
    from agentd.runtime.state import CommitFailed

__all__ = ["SQLiteStateStore"]

log = logging.getLogger(__name__)

T = TypeVar("T")


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


def _loads_done(items: list, task: asyncio.Future) -> None:
    error = asyncio.CancelledError() if task.cancelled() else task.exception()
    if error is not None:
        log.error("state store load failed: %s", error)
        for _, future in items:
            if not future.done():
                future.set_exception(error)
        return
    found = task.result()
    for address, future in items:
        if not future.done():
            future.set_result(found.get(address))


class SQLiteStateStore:
    """Snapshots in one SQLite table; every statement runs on one dedicated thread."""

    _CHUNK = 500  # keys per SELECT ... IN (...)
    _ROWS_PER_INSERT = 400  # 800 parameters: under every SQLite build's variable limit
    _LOG_EVERY_S = 10.0  # while commits keep failing, one log line per this many seconds
    _BUSY_TIMEOUT_S = 60.0  # how long a statement waits for another process's lock

    def __init__(self, path: Path | str, *, failure_window_s: float = 10.0) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state-store")
        self._db: sqlite3.Connection | None = None
        self._saves = _Grouped(self._flush_saves)  # flat: address, snapshot, address, ...
        # Flat too: address, future, ... for the ``save`` calls since the last flush.
        self._save_waiters: list = []
        self._loads = _Grouped(self._flush_loads)
        self.writes = 0
        self.commits = 0
        self.last_commit_size = 0  # saves in the last group committed (or failed)
        self.errors = 0
        self.empty_at_open = False
        self.on_commit_failed: CommitFailed | None = None
        self._health = StoreHealth(
            log,
            noun="commit",
            recovered="state store commits succeed again (after %d failed)",
            window_s=failure_window_s,
            log_every_s=self._LOG_EVERY_S,
        )

    async def open(self) -> None:
        await self._call(self._open)

    def _open(self) -> None:
        # The processes of ``serve --processes N`` share this file: a commit waits for
        # another process's transaction (a swarm process's group of 500k states holds the
        # write lock for seconds) instead of failing with "database is locked" after
        # SQLite's default 5 s. Locks of a dead process are released by the OS.
        db = sqlite3.connect(
            self._path, check_same_thread=False, isolation_level=None, timeout=self._BUSY_TIMEOUT_S
        )
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
        waiters = self._save_waiters
        waiters.append(address)
        waiters.append(future)
        self._saves.add_pair(address, snapshot)
        return future

    def save_nowait(self, address: str, snapshot: bytes) -> None:
        """Queue a write nobody waits for (a failed commit is logged and reported to
        ``on_commit_failed``)."""
        self._saves.add_pair(address, snapshot)

    def failing(self) -> str | None:
        return self._health.failing()

    def _flush_saves(self, items: list) -> asyncio.Future:
        # ``items`` is flat (address, snapshot, address, ...); the waiters of this group
        # are those of ``save`` calls since the last flush.
        waiting, self._save_waiters = self._save_waiters, []
        task = asyncio.ensure_future(self._call(self._upsert, items))
        # Registered before _Grouped's own callback, so this runs before the next group
        # is taken from the queue.
        task.add_done_callback(functools.partial(self._saves_done, items, waiting))
        return task

    def _saves_done(self, items: list, waiting: list, task: asyncio.Future) -> None:
        error = asyncio.CancelledError() if task.cancelled() else task.exception()
        # The group's size, read by the waiters' callbacks (state.commit spans), which run
        # before the next group can finish.
        self.last_commit_size = len(items) // 2
        if error is None:
            if self._health.failures:
                self._health.succeeded()
            for i in range(1, len(waiting), 2):
                future = waiting[i]
                if not future.done():
                    future.set_result(None)
            return
        self._commit_failed(items, waiting, error)

    def _commit_failed(self, items: list, waiting: list, error: BaseException) -> None:
        self.errors += 1
        self._health.failed("commit", f"{type(error).__name__}: {error}")
        failed = set(items[0::2])
        # Saves still queued for these agents were made on top of the state that failed:
        # committing them later would apply the failed turn after all.
        queued = self._saves.items
        if queued:
            keep = []
            for i in range(0, len(queued), 2):
                if queued[i] not in failed:
                    keep.append(queued[i])
                    keep.append(queued[i + 1])
            queued[:] = keep  # in place: the group holds this list
            still_waiting = []
            pending = self._save_waiters
            for i in range(0, len(pending), 2):
                if pending[i] in failed:
                    waiting.append(pending[i])
                    waiting.append(pending[i + 1])
                else:
                    still_waiting.append(pending[i])
                    still_waiting.append(pending[i + 1])
            pending[:] = still_waiting
        for i in range(1, len(waiting), 2):
            future = waiting[i]
            if not future.done():
                future.set_exception(error)
        if self.on_commit_failed is not None:
            try:
                self.on_commit_failed(failed, error)
            except Exception:
                log.exception("state store: the commit-failure handler raised")

    def _flush_loads(self, items: list) -> asyncio.Future:
        # ``items`` holds (address, future) pairs.
        addresses = [address for address, _ in items]
        task = asyncio.ensure_future(self._call(self._select, addresses))
        task.add_done_callback(functools.partial(_loads_done, items))
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

    async def flush(self) -> None:
        await self._saves.drain()

    async def aclose(self) -> None:
        await self._saves.drain()
        await self._loads.drain()
        if self._db is not None:
            await self._call(self._db.close)
            self._db = None
        self._thread.shutdown(wait=True)
