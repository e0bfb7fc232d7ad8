"""What every StateStore implementation owes the actor host (agentd.runtime.state): run
against each implementation (memory, SQLite, and Redis on a real redis-server started by
the test), so that a new backend joins the parametrization and is held to the same rules."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from agentd.runtime import MemoryStateStore, SQLiteStateStore, StateStore
from agentd.runtime.state.redis import RedisStateStore
from tests.cluster.servers import redis_server

STORES = ("memory", "redis", "sqlite")
DURABLE = ("redis", "sqlite")  # what they committed outlives the store object


@pytest.fixture(params=STORES)
def make_store(request, tmp_path: Path) -> Iterator[Callable[[], StateStore]]:
    """New store objects over one storage: a file, a real redis-server (started here)."""
    if request.param == "redis":
        with redis_server(tmp_path) as server:
            yield lambda: RedisStateStore(server.url)
    elif request.param == "sqlite":
        yield lambda: SQLiteStateStore(tmp_path / "state.db")
    else:
        yield MemoryStateStore


@pytest.fixture
async def store(make_store: Callable[[], StateStore]) -> AsyncIterator[StateStore]:
    store = make_store()
    store.on_commit_failed = None
    await store.open()
    yield store
    await store.aclose()


async def test_a_new_store_is_empty_and_healthy(store: StateStore) -> None:
    assert store.empty_at_open
    assert store.errors == 0
    assert store.failing() is None
    assert await store.load("a/1") is None


async def test_saved_snapshots_load_back_last_write_wins(store: StateStore) -> None:
    committed = store.save("a/1", b'{"n":1}')
    store.save_nowait("a/2", b'{"n":2}')
    store.save_nowait("a/1", b'{"n":3}')
    await committed
    last = store.save("a/3", b"{}")
    await last  # saves are committed in order: those before it are committed too
    loaded = await asyncio.gather(*(store.load(k) for k in ("a/1", "a/2", "a/3", "a/4")))
    assert loaded == [b'{"n":3}', b'{"n":2}', b"{}", None]
    assert store.failing() is None


@pytest.mark.parametrize("make_store", DURABLE, indirect=True)
async def test_what_aclose_committed_is_there_after_reopening(
    make_store: Callable[[], StateStore],
) -> None:
    first = make_store()
    await first.open()
    first.save_nowait("a/1", b'{"n":1}')
    await first.aclose()  # commits what is queued
    again = make_store()
    await again.open()
    assert not again.empty_at_open
    assert await again.load("a/1") == b'{"n":1}'
    await again.aclose()
