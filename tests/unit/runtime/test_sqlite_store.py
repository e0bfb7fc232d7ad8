"""SQLite state: group commit, restart, and no acknowledged state lost to kill -9."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import orjson

from agentd import Agent
from agentd.agents import AgentRegistry
from agentd.runtime import ActorHost, Runtime, SQLiteStateStore, WorkerPool


class Tally(Agent):
    name = "tally"

    async def handle(self, ctx, message):
        ctx.state["n"] = ctx.state.get("n", 0) + 1
        return str(ctx.state["n"])


def make_runtime(path) -> Runtime:
    registry = AgentRegistry()
    registry.register(Tally)
    host = ActorHost(registry, SQLiteStateStore(path), pool=WorkerPool(64, 10_000))
    return Runtime(host)


async def test_group_commit_and_restart(tmp_path):
    path = tmp_path / "state.db"
    runtime = make_runtime(path)
    await runtime.start()
    await asyncio.gather(*(runtime.host.ask(f"tally/{i % 50}", None) for i in range(1000)))
    store = runtime.host.store
    await runtime.aclose()
    assert 50 <= store.writes <= 1000  # rows; a group keeps only an agent's last state
    assert store.commits < 100  # many turns per transaction

    again = make_runtime(path)  # a new process would see the same
    await again.start()
    assert await again.host.ask("tally/7", None) == "21"
    await again.aclose()


async def test_loads_are_grouped_and_missing_is_empty(tmp_path):
    store = SQLiteStateStore(tmp_path / "s.db")
    await store.open()
    await store.save("a/1", b'{"x":1}')
    found = await asyncio.gather(*(store.load(f"a/{i}") for i in range(1200)))
    assert found[1] == b'{"x":1}'
    assert found.count(None) == 1199
    await store.aclose()


async def test_last_write_in_a_group_wins(tmp_path):
    store = SQLiteStateStore(tmp_path / "s.db")
    await store.open()
    store.save_nowait("a/1", b"1")
    store.save_nowait("a/2", b"x")
    store.save_nowait("a/1", b"2")
    await store.save("a/3", b"3")  # the same group: committed together
    assert await store.load("a/1") == b"2"
    assert await store.load("a/2") == b"x"
    assert store.writes == 3 and store.commits == 1
    await store.aclose()


WRITER = textwrap.dedent(
    """
    import asyncio, sys
    sys.path[:0] = {paths!r}
    from tests.unit.runtime.test_sqlite_store import make_runtime

    async def main():
        runtime = make_runtime({db!r})
        await runtime.start()
        async def one(i):
            agent = f"tally/{{i % 40}}"
            n = await runtime.host.ask(agent, None)
            print(agent, n, flush=True)
        i = 0
        while True:
            await asyncio.gather(*(one(i + k) for k in range(200)))
            i += 200

    asyncio.run(main())
    """
)


def test_kill_9_loses_no_acknowledged_state(tmp_path):
    db = tmp_path / "crash.db"
    script = WRITER.format(paths=sys.path, db=str(db))
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=os.getcwd()
    )
    acked: dict[str, int] = {}
    deadline = time.monotonic() + 20
    assert proc.stdout is not None
    for line in proc.stdout:
        agent, n = line.split()
        acked[agent] = max(acked.get(agent, 0), int(n))
        if sum(acked.values()) >= 3000 or time.monotonic() > deadline:
            break
    os.kill(proc.pid, signal.SIGKILL)  # mid-write: the writer never stops on its own
    proc.wait()
    proc.stdout.close()
    assert sum(acked.values()) >= 3000, "the writer was too slow to test anything"

    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        stored = {
            address: orjson.loads(state)["n"]
            for address, state in conn.execute("SELECT address, state FROM agent_state")
        }
    for agent, n in acked.items():
        # Every reply was sent after its state was committed.
        assert stored[agent] >= n, (agent, stored.get(agent), n)
