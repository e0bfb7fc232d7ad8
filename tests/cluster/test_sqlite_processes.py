"""SQLite shared by the processes of one machine (``agentd serve --processes N``): several
OS processes open one file at once and write through SQLiteStateStore concurrently; none
fails with "database is locked" and nothing committed is lost."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from pathlib import Path

from agentd.runtime import SQLiteStateStore

WRITER = """
import asyncio, sys
from agentd.runtime import SQLiteStateStore

async def main(path, me, rounds, per_round):
    store = SQLiteStateStore(path)
    await store.open()
    for r in range(rounds):
        # Many small commits: each round is one group, racing the other processes'.
        await asyncio.gather(*(
            store.save(f"p{me}/{k}", b'{"r":%d}' % r) for k in range(per_round)
        ))
        store.save_nowait("shared/last", b'{"by":%d,"r":%d}' % (me, r))
    await store.aclose()
    print(store.commits, store.errors)

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
"""

PROCESSES, ROUNDS, PER_ROUND = 3, 150, 50


async def test_three_processes_write_one_file_without_locking_errors(tmp_path: Path) -> None:
    path = tmp_path / "agents.db"
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            WRITER,
            str(path),
            str(me),
            str(ROUNDS),
            str(PER_ROUND),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for me in range(PROCESSES)
    ]
    outputs = [await asyncio.wait_for(child.communicate(), 120) for child in children]
    for child, (out, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0, err.decode()[-2000:]
        assert b"database is locked" not in err, err.decode()[-2000:]
        commits, errors = map(int, out.split())
        assert errors == 0 and commits >= ROUNDS

    # Every process's last round is there, for every one of its agents.
    with sqlite3.connect(path) as db:
        rows = dict(db.execute("SELECT address, state FROM agent_state"))
    for me in range(PROCESSES):
        for k in range(PER_ROUND):
            assert rows[f"p{me}/{k}"] == b'{"r":%d}' % (ROUNDS - 1)
    assert rows["shared/last"].endswith(b'"r":%d}' % (ROUNDS - 1))

    # And another store object (a process after a change of --processes) reads them.
    store = SQLiteStateStore(path)
    await store.open()
    assert not store.empty_at_open
    assert await store.load("p2/7") == b'{"r":%d}' % (ROUNDS - 1)
    await store.aclose()


async def test_a_commit_waits_out_another_processs_long_transaction(tmp_path: Path) -> None:
    # Another process's big group (a swarm process committing 500k states) can hold the
    # write lock for seconds: SQLite's default 5 s busy timeout would fail this commit
    # with "database is locked".
    path = tmp_path / "agents.db"
    store = SQLiteStateStore(path)
    await store.open()
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # holds the write lock
    other.execute("INSERT INTO agent_state VALUES ('other/1', x'7b7d')")
    loop = asyncio.get_running_loop()
    loop.call_later(6.0, other.execute, "COMMIT")
    await store.save("mine/1", b"{}")
    other.close()
    assert store.errors == 0
    assert await store.load("other/1") == b"{}"
    await store.aclose()
