"""One tool cannot starve the others, and the sandboxes together stay inside a memory budget.

Against the real sandbox: the session's built test tools (tests/tools/plugins/tools), served
by the ToolService that ``agentd serve`` builds from settings (``open_tool_service``).
Floods are bounded (tens of calls, a fraction of a second of CPU each) and time bounds are
generous: the machine is shared. What the tests pin is order and counts, not speed.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from agentd.observability import Metrics
from agentd.settings import load_settings
from agentd.testing import start_server
from agentd.tools import ToolErrorKind
from agentd.tools.build import ToolArtefact
from agentd.tools.factory import open_tool_service
from agentd.tools.service import ToolService
from tests.conftest import metric_value
from tests.tools.support import (
    PLUGINS,
    cache_dir,
    is_tool_error,
    raises_tool_error,
    session_artefact,
)

MiB = 1024 * 1024


@pytest.fixture(scope="session")
def artefact(tmp_path_factory: pytest.TempPathFactory) -> ToolArtefact:
    return session_artefact(tmp_path_factory)


@pytest.fixture
def settings(artefact: ToolArtefact, tmp_path_factory: pytest.TempPathFactory) -> Callable:
    def make(**overrides: Any):
        values: dict[str, Any] = {
            "tools_cache_dir": cache_dir(tmp_path_factory),
            "plugins": PLUGINS,
            "tool_max_fuel": 300_000_000,  # loop_forever: ~30-100 ms of CPU, then out of fuel
            "tool_max_memory_bytes": 128 * MiB,
            "tool_timeout_s": 10.0,
            "tool_pool_size": 2,
        }
        values.update(overrides)
        return load_settings(**values)

    return make


@asynccontextmanager
async def serving(settings: Any, observer: Any = None) -> AsyncIterator[ToolService]:
    service = open_tool_service(settings, observer)
    await service.start()
    assert service.available, service.unavailable_reason
    try:
        yield service
    finally:
        await service.aclose()


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def tool_call_finished(self, tool: str, outcome: str, seconds: float, fuel: int) -> None:
        self.calls.append((tool, outcome))


@pytest.mark.parametrize(
    ("per_tool", "flood_size", "may_start_first"),
    [
        (None, 40, 1),  # default cap (half of 2 threads): the flood holds one thread
        (2, 24, 4),  # the flood may hold both: the other call takes the next free one
    ],
)
async def test_a_flood_of_one_tool_does_not_hold_up_another_tools_call(
    settings, per_tool, flood_size, may_start_first
):
    config = settings(tool_threads=2, tool_max_running_per_tool=per_tool)
    async with serving(config) as service:
        started = time.monotonic()
        with raises_tool_error(ToolErrorKind.OUT_OF_FUEL):
            await service.call("loop_forever")
        one_call = time.monotonic() - started

        flood = [asyncio.create_task(service.call("loop_forever")) for _ in range(flood_size)]
        await asyncio.sleep(0.02)  # the flood is queued first
        started = time.monotonic()
        assert await service.call("add", {"a": 41}) == 42
        waited = time.monotonic() - started
        pending = sum(not task.done() for task in flood)
        results = await asyncio.gather(*flood, return_exceptions=True)

    assert all(is_tool_error(r, ToolErrorKind.OUT_OF_FUEL) for r in results), results
    # Served ahead of the flood: at most a couple of flood calls finished before it.
    assert pending >= flood_size - may_start_first, (pending, waited, one_call)
    assert waited < 2 * one_call + 1.0, (waited, one_call)


async def test_the_memory_budget_bounds_sandboxes_running_at_once(settings):
    # 16 calls that each touch 64 MiB and then run out of their 128 MiB, on 8 threads, with
    # a budget for 3: never more than 3 run, and the process grows by about 3 calls' worth.
    config = settings(
        tool_threads=8,
        tool_max_running_per_tool=8,
        tool_max_total_memory_bytes=3 * 128 * MiB + 64 * MiB,
    )
    async with serving(config) as service:
        await service.call("add", {"a": 1})  # threads and instances warm
        baseline = _rss()
        peak_rss = baseline
        peak_running = 0
        sampling = True

        def sample_rss() -> None:
            nonlocal peak_rss
            while sampling:
                peak_rss = max(peak_rss, _rss())
                time.sleep(0.002)

        sampler = threading.Thread(target=sample_rss)
        sampler.start()
        try:
            calls = [asyncio.create_task(service.call("allocate_4gib")) for _ in range(16)]
            while not all(task.done() for task in calls):
                peak_running = max(peak_running, service.statistics().num_running)
                await asyncio.sleep(0.001)
            results = await asyncio.gather(*calls, return_exceptions=True)
        finally:
            sampling = False
            sampler.join()
        # Other tools still answer after the memory flood.
        assert await service.call("add", {"a": 1}) == 2

    assert all(is_tool_error(r, ToolErrorKind.OUT_OF_MEMORY) for r in results), results
    assert peak_running == 3
    growth = peak_rss - baseline
    # 3 calls reserve 384 MiB; 16 at once (8 threads) grew the process by 500-1,000 MiB.
    assert growth < 3 * 128 * MiB + 64 * MiB, f"grew {growth / MiB:.0f} MiB"


async def test_a_queued_call_past_its_deadline_is_answered_then_and_never_runs(settings):
    recorder = Recorder()
    config = settings(tool_threads=1, tool_max_fuel=10**15, tool_timeout_s=1.0)
    async with serving(config, recorder) as service:
        hog = asyncio.create_task(service.call("loop_forever"))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        with raises_tool_error(ToolErrorKind.DEADLINE, match="waited past its deadline to start"):
            await service.call("count_calls", timeout=0.2)
        waited = time.monotonic() - started
        with raises_tool_error(ToolErrorKind.DEADLINE):
            await hog
    assert 0.15 < waited < 0.6
    assert ("count_calls", "deadline") in recorder.calls
    assert ("count_calls", "ok") not in recorder.calls


async def test_cancelled_callers_leave_the_queue(settings):
    recorder = Recorder()
    config = settings(tool_threads=1, tool_max_fuel=10**15, tool_timeout_s=0.5)
    async with serving(config, recorder) as service:
        hog = asyncio.create_task(service.call("loop_forever"))
        await asyncio.sleep(0.05)
        queued = [asyncio.create_task(service.call("count_calls")) for _ in range(10)]
        await asyncio.sleep(0.02)
        assert service.statistics().queued_per_tool["count_calls"] == 10
        for task in queued:
            task.cancel()
        await asyncio.gather(*queued, return_exceptions=True)
        assert service.statistics().num_queued == 0
        assert service.in_flight == 1
        with raises_tool_error(ToolErrorKind.DEADLINE):
            await hog
        assert await service.call("add", {"a": 1}) == 2
    assert recorder.calls.count(("count_calls", "cancelled")) == 10
    assert ("count_calls", "ok") not in recorder.calls


async def test_closing_answers_every_waiting_caller_and_none_hangs(settings):
    config = settings(tool_threads=1, tool_max_fuel=10**15, tool_timeout_s=1.0)
    service = open_tool_service(config)
    await service.start()
    hog = asyncio.create_task(service.call("loop_forever"))
    await asyncio.sleep(0.05)
    waiting = [
        asyncio.create_task(service.call(name, args))
        for name, args in [("add", {"a": 1}), ("count_calls", {}), ("loop_forever", {})] * 3
    ]
    await asyncio.sleep(0.02)
    started = time.monotonic()
    closing = asyncio.create_task(service.aclose())
    results = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 5)
    answered = time.monotonic() - started
    for result in results:
        assert is_tool_error(result, ToolErrorKind.UNAVAILABLE), result
        assert result.message == "tools are unavailable: the tool service is shut down"
    assert answered < 0.5  # at once, not when the running call ends
    with raises_tool_error(ToolErrorKind.DEADLINE):  # the running call ends by its deadline
        await asyncio.wait_for(hog, 5)
    await asyncio.wait_for(closing, 5)


async def test_admission_metrics_on_a_scrape(settings):
    metrics = Metrics()
    config = settings(tool_threads=2)
    async with serving(config, metrics) as service:
        flood = [asyncio.create_task(service.call("loop_forever")) for _ in range(6)]
        await asyncio.sleep(0.02)
        text = metrics.render()[0].decode()
        await asyncio.gather(*flood, return_exceptions=True)
    assert 'agentd_tool_calls_queued{tool="loop_forever"} 5.0' in text
    assert 'agentd_tool_calls_running{tool="loop_forever"} 1.0' in text
    after = metrics.render()[0].decode()
    assert 'agentd_tool_queue_wait_seconds_count{tool="loop_forever"} 6.0' in after
    assert 'agentd_tool_calls_queued{tool="loop_forever"} 0.0' in after


async def test_over_the_wire_a_flood_gets_429_while_another_tool_answers(
    artefact, tmp_path_factory
):
    env = {
        "AGENTD_TOOLS_CACHE_DIR": str(cache_dir(tmp_path_factory)),
        # The flood's calls hold their thread to the deadline; those waiting expire then too.
        "AGENTD_TOOL_MAX_FUEL": str(10**15),
        "AGENTD_TOOL_TIMEOUT_S": "1.5",
        "AGENTD_TOOL_THREADS": "2",
        "AGENTD_TOOL_MAX_QUEUED_PER_TOOL": "6",
    }
    server = start_server(["--plugins", str(PLUGINS)], env=env)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:

            async def call(name: str, arguments: dict) -> httpx.Response:
                body = {"name": name, "argumentsJson": json.dumps(arguments)}
                return await client.post("/agentd.v1.AgentService/CallTool", json=body)

            flood = [asyncio.create_task(call("loop_forever", {})) for _ in range(12)]
            for _ in range(40):  # until the flood is in: one running, six waiting, five refused
                await asyncio.sleep(0.025)
                scrape = (await client.get("/metrics")).text
                if metric_value(scrape, "agentd_tool_queue_rejections_total") == 5:
                    break
            started = time.monotonic()
            answer = await call("add", {"a": 41})
            answered_in = time.monotonic() - started
            scrape = (await client.get("/metrics")).text
            replies = await asyncio.gather(*flood)
    finally:
        server.stop()
    assert answer.status_code == 200, answer.text
    assert json.loads(answer.json()["resultJson"]) == 42
    assert answered_in < 1.0, answered_in  # not after the flood's 1.5 s
    # One ran to its deadline and the six waiting expired at theirs without running (or the
    # next one started in the moments its deadline had left), five were refused at once.
    outcomes = [(r.status_code, r.json()["code"], r.json()["message"]) for r in replies]
    ran = [o for o in outcomes if "did not finish" in o[2]]
    waited = [o for o in outcomes if "waited past its deadline to start" in o[2]]
    assert (len(ran) + len(waited), len(waited) >= 5) == (7, True), outcomes
    assert {o[:2] for o in ran + waited} == {(504, "deadline_exceeded")}
    refused = [o for o in outcomes if "too many calls of tool 'loop_forever' waiting" in o[2]]
    assert len(refused) == 5, outcomes
    assert {o[:2] for o in refused} == {(429, "resource_exhausted")}
    assert metric_value(scrape, "agentd_tool_calls_queued", tool="loop_forever") == 6
    assert metric_value(scrape, "agentd_tool_calls_running", tool="loop_forever") == 1
    assert metric_value(scrape, "agentd_tool_queue_rejections_total") == 5
    assert metric_value(scrape, "agentd_tool_queue_wait_seconds_count", tool="add") == 1


def test_serve_refuses_a_per_call_memory_limit_over_the_budget(tmp_path):
    env = {
        **os.environ,
        "AGENTD_TOOL_MAX_MEMORY_BYTES": str(2048 * MiB),
        "AGENTD_TOOLS_CACHE_DIR": str(tmp_path),
    }
    done = subprocess.run(
        [sys.executable, "-m", "agentd", "serve", "--port", "0", "--plugins", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    out = done.stdout + done.stderr
    assert "invalid settings" in out
    assert "tool_max_memory_bytes (2,147,483,648) is larger than" in out
    assert "tool_max_total_memory_bytes (1,073,741,824): no tool call could run" in out
    assert "Traceback" not in out


def _rss() -> int:
    with open(f"/proc/{os.getpid()}/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
