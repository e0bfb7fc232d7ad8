"""Live reload under load, on a real ``agentd serve``: 64 clients call one agent type over
Connect JSON while its plugin file is rewritten 100 times. No call fails; every answer comes
from a version that was written, never a mix within one turn; each instance's state carries
on across the reloads; the migration hook runs."""

from __future__ import annotations

import asyncio
import re
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agentd.testing import RunningServer, start_server
from tests.conftest import metric_value

INVOKE = "/agentd.v1.AgentService/Invoke"
CLIENTS = 64
RELOADS = 100

# Each version names itself twice, read at the start and at the end of the turn (with a
# pause between): a turn that mixed two versions would answer two different names.
PLUGIN = """
import asyncio

from agentd import Agent

VERSION = {version!r}


class Ver(Agent):
    name = "ver"

    @classmethod
    def migrate_state(cls, state, previous_version):
        return {{**state, "migrations": state.get("migrations", 0) + 1}}

    async def handle(self, ctx, message):
        first = VERSION
        await asyncio.sleep(0.002)
        ctx.state["n"] = ctx.state.get("n", 0) + 1
        return f"{{first}}|{{VERSION}}|{{ctx.state['n']}}|{{ctx.state.get('migrations', 0)}}"
"""
REPLY = re.compile(r"(v\d+)\|(v\d+)\|(\d+)\|(\d+)")


def write_version(path: Path, index: int) -> None:
    path.write_text(textwrap.dedent(PLUGIN.format(version=f"v{index}")))


@pytest.fixture
def reloading(tmp_path: Path) -> Iterator[tuple[RunningServer, Path]]:
    (tmp_path / "agents").mkdir()
    path = tmp_path / "agents" / "ver.py"
    write_version(path, 0)
    running = start_server(["--plugins", str(tmp_path)], env={"AGENTD_RELOAD_DEBOUNCE_MS": "20"})
    yield running, path
    running.stop()


async def test_100_reloads_under_64_clients(reloading: tuple[RunningServer, Path]) -> None:
    server, path = reloading
    answers: dict[int, list[tuple[str, str, int, int]]] = {i: [] for i in range(CLIENTS)}
    failures: list[str] = []
    writing = True

    async def client(http: httpx.AsyncClient, i: int) -> None:
        # Until the writes are done and this client has seen the last version.
        while writing or not answers[i] or answers[i][-1][0] != f"v{RELOADS}":
            r = await http.post(INVOKE, json={"agent": f"ver/c{i}", "message": {"text": "x"}})
            if r.status_code != 200:
                failures.append(f"{r.status_code} {r.text[:200]}")
                continue
            match = REPLY.fullmatch(r.json()["message"]["text"])
            assert match, r.text
            first, last, n, migrations = match.groups()
            answers[i].append((first, last, int(n), int(migrations)))

    limits = httpx.Limits(max_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as http:
        # Every client has its instance before the first reload.
        for i in range(CLIENTS):
            r = await http.post(INVOKE, json={"agent": f"ver/c{i}", "message": {"text": "x"}})
            assert r.status_code == 200, r.text
        for i in range(CLIENTS):
            answers[i].append(("v0", "v0", 1, 0))
        clients = [asyncio.create_task(client(http, i)) for i in range(CLIENTS)]
        started = time.monotonic()
        for index in range(1, RELOADS + 1):
            write_version(path, index)
            await asyncio.sleep(0.08)  # past the debounce: one reload per write
        writing = False
        await asyncio.wait_for(asyncio.gather(*clients), 60)
        elapsed = time.monotonic() - started
        metrics = (await http.get("/metrics")).text

    assert failures == []
    calls = sum(len(a) for a in answers.values())
    written = {f"v{k}" for k in range(RELOADS + 1)}
    seen = set()
    for i, replies in answers.items():
        for first, last, _, _ in replies:
            assert first == last, (i, first, last)  # never a mix within a turn
            assert first in written
            seen.add(first)
        # The instance's state carried on across every reload: its count never restarted.
        assert [n for _, _, n, _ in replies] == list(range(1, len(replies) + 1)), i
        migrations = [m for _, _, _, m in replies]
        assert migrations == sorted(migrations) and migrations[-1] >= 1, i
    reloads = metric_value(metrics, "agentd_plugin_reloads_total", kind="agents", outcome="ok")
    print(
        f"{calls} calls in {elapsed:.1f}s, {len(seen)} versions answered, "
        f"{reloads:.0f} reloads, 0 failed"
    )
    assert len(seen) >= 10  # the calls did span the reloads
    assert RELOADS / 2 <= reloads <= RELOADS
    assert (
        metric_value(metrics, "agentd_plugin_reloads_total", kind="agents", outcome="failed") == 0
    )
