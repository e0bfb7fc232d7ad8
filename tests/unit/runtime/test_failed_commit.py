"""A state commit that fails takes no effect: the agent rolls back to what the store holds.

The stores here fail on demand at the adapter boundary (SQLite's own "database or disk is
full" error raised where the write would run), and one test fills a real SQLite database
up to its page limit. The live-server version with a full file system is in
tests/security/test_faults.py.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading

import pytest

from agentd import Agent
from agentd.agents import AgentRegistry
from agentd.errors import Unavailable
from agentd.runtime import ActorHost, Runtime, SQLiteStateStore, WorkerPool


class Tally(Agent):
    name = "tally"
    gate: asyncio.Event | None = None  # set by a test: "wait" turns hold until it is set

    async def handle(self, ctx, message):
        if message == "wait":
            assert self.gate is not None
            await self.gate.wait()
        ctx.state["n"] = ctx.state.get("n", 0) + 1
        return str(ctx.state["n"])


class Grower(Agent):
    name = "grower"

    async def handle(self, ctx, message):
        ctx.state[str(len(ctx.state))] = "x" * 3000
        return str(len(ctx.state))


class FlakyStore(SQLiteStateStore):
    """SQLite that fails commits (as a full disk does) while ``full`` is set or for the
    next ``fail_commits`` commits, and can hold a commit until ``release`` is set."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.full = False
        self.fail_commits = 0
        self.fail_loads = False
        self.release = threading.Event()
        self.release.set()

    def _upsert(self, flat: list) -> None:
        self.release.wait(10)
        if self.fail_commits > 0:
            self.fail_commits -= 1
            raise sqlite3.OperationalError("database or disk is full")
        if self.full:
            raise sqlite3.OperationalError("database or disk is full")
        super()._upsert(flat)

    def _select(self, addresses: list[str]) -> dict[str, bytes]:
        if self.fail_loads:
            raise sqlite3.OperationalError("disk I/O error")
        return super()._select(addresses)


def make_runtime(store: SQLiteStateStore) -> Runtime:
    registry = AgentRegistry()
    registry.register(Tally)
    registry.register(Grower)
    return Runtime(ActorHost(registry, store, pool=WorkerPool(8, 1000)))


async def until(condition, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not condition():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.01)


async def ask(runtime: Runtime, address: str, message: object = None) -> str:
    return await runtime.host.ask(address, message, timeout=10)


async def test_a_failed_commit_is_not_applied_by_a_later_one(tmp_path):
    store = FlakyStore(tmp_path / "s.db")
    runtime = make_runtime(store)
    await runtime.start()
    assert await ask(runtime, "tally/a") == "1"

    store.full = True
    with pytest.raises(Unavailable, match="could not be saved: database or disk is full"):
        await ask(runtime, "tally/a")
    store.full = False
    # The failed call did not count: the retry is the second, not the third.
    assert await ask(runtime, "tally/a") == "2"
    assert await ask(runtime, "tally/a") == "3"
    await runtime.aclose()

    again = make_runtime(SQLiteStateStore(tmp_path / "s.db"))
    await again.start()
    assert await ask(again, "tally/a") == "4"
    await again.aclose()


async def test_pipelined_turns_and_tells_on_a_failed_state_are_dropped(tmp_path):
    store = FlakyStore(tmp_path / "s.db")
    runtime = make_runtime(store)
    await runtime.start()
    assert await ask(runtime, "tally/b") == "1"

    # One commit fails; while it is held, more turns run on top of its state and queue
    # their saves. Those would commit fine, but must not: they carry the failed change.
    store.fail_commits = 1
    store.release.clear()
    calls = [asyncio.ensure_future(ask(runtime, "tally/b")) for _ in range(20)]
    for _ in range(5):
        await runtime.host.tell("tally/b", None)
    await until(lambda: runtime.host.turns == 26)  # all ran, their saves queued
    store.release.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, Unavailable) for r in results), results
    assert store.fail_commits == 0 and store.errors == 1

    assert await ask(runtime, "tally/b") == "2"
    await runtime.aclose()


async def test_a_turn_running_when_an_earlier_commit_fails_is_not_applied(tmp_path):
    store = FlakyStore(tmp_path / "s.db")
    runtime = make_runtime(store)
    await runtime.start()
    agent = runtime.host.instance("tally/c")
    agent.gate = asyncio.Event()
    assert await ask(runtime, "tally/c") == "1"

    store.full = True
    store.release.clear()  # the next commit hangs until released, then fails
    first = asyncio.ensure_future(ask(runtime, "tally/c"))  # n=2, commit held
    await until(lambda: runtime.host.turns == 2)
    second = asyncio.ensure_future(ask(runtime, "tally/c", "wait"))  # runs on n=2
    await until(lambda: runtime.host.pool.statistics().busy == 1)
    store.release.set()
    with pytest.raises(Unavailable, match="could not be saved"):
        await first
    store.full = False
    agent.gate.set()
    with pytest.raises(Unavailable, match="not applied, try again"):
        await second
    assert await ask(runtime, "tally/c") == "2"
    await runtime.aclose()


async def test_a_real_full_database_rolls_back(tmp_path):
    """SQLite's own SQLITE_FULL: the database may not grow past its page limit."""
    store = SQLiteStateStore(tmp_path / "s.db")
    runtime = make_runtime(store)
    await runtime.start()
    assert await ask(runtime, "grower/g") == "1"

    def limit(pages: int | None) -> int:
        db = store._db
        assert db is not None
        if pages is None:
            pages = db.execute("PRAGMA page_count").fetchone()[0]
        return db.execute(f"PRAGMA max_page_count = {pages}").fetchone()[0]

    await store._call(limit, None)  # no room to grow
    for _ in range(3):
        with pytest.raises(Unavailable, match="database or disk is full"):
            await ask(runtime, "grower/g")
    assert store.errors == 3
    assert "database or disk is full" in (store.failing() or "")
    await store._call(limit, 1_000_000)
    assert await ask(runtime, "grower/g") == "2"
    assert store.failing() is None
    await runtime.aclose()


async def test_health_and_metrics_follow_the_commits(tmp_path):
    store = FlakyStore(tmp_path / "s.db", failure_window_s=0.3)
    runtime = make_runtime(store)
    await runtime.start()
    host = runtime.host
    assert host.store_failing() is None
    assert host.gauges()["state_failing"] == 0

    store.full = True
    for _ in range(3):
        with pytest.raises(Unavailable):
            await ask(runtime, "tally/h")
    reason = host.store_failing()
    assert reason is not None and "the last 3 commits failed" in reason, reason
    assert "database or disk is full" in reason
    gauges = host.gauges()
    assert gauges["state_errors"] == 3 and gauges["state_failing"] == 1

    # With no commit to try, failing ends after the window (or a node that is not ready
    # gets no traffic and can never show that the store works again).
    await asyncio.sleep(0.4)
    assert host.store_failing() is None
    with pytest.raises(Unavailable):
        await ask(runtime, "tally/h")
    assert host.store_failing() is not None

    store.full = False
    assert await ask(runtime, "tally/h") == "1"  # recovered at once: a commit succeeded
    assert host.store_failing() is None
    assert host.gauges()["state_errors"] == 4
    await runtime.aclose()


async def test_a_failed_load_fails_the_call_instead_of_hanging(tmp_path):
    store = FlakyStore(tmp_path / "s.db")
    runtime = make_runtime(store)
    await runtime.start()
    assert await ask(runtime, "tally/l") == "1"
    runtime.host.passivate_idle(0)

    store.fail_loads = True
    with pytest.raises(Unavailable, match="could not be read: disk I/O error"):
        await ask(runtime, "tally/l")
    store.fail_loads = False
    assert await ask(runtime, "tally/l") == "2"
    await runtime.aclose()
