"""Fair admission of tool calls: the scheduler alone, then the service over a fake runtime.

No sandbox here: the scheduler is plain asyncio, and the service runs calls on its threads
against :class:`SleepingRuntime`, a ToolRuntime whose calls take a set time. The same rules
against the real sandbox are in tests/security/test_tool_fairness.py.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from agentd.errors import ConfigError
from agentd.observability import Metrics
from agentd.settings import load_settings
from agentd.tools import CallOutcome, ToolErrorKind, ToolLimits, ToolSpec
from agentd.tools.admission import AdmissionLimits, FairScheduler, Grant
from agentd.tools.factory import open_tool_service
from agentd.tools.service import ToolService
from tests.tools.support import is_tool_error, raises_tool_error

MiB = 1024 * 1024


def scheduler(
    *,
    running: int = 1,
    per_tool: int = 1,
    queued: int = 100,
    queued_per_tool: int = 100,
    memory: int = 1 << 40,
) -> FairScheduler:
    return FairScheduler(
        AdmissionLimits(
            max_running=running,
            max_running_per_tool=per_tool,
            max_queued=queued,
            max_queued_per_tool=queued_per_tool,
            max_memory_bytes=memory,
        )
    )


class Admitted:
    """Callers of one scheduler, each a task; records the order slots were granted."""

    def __init__(self, sched: FairScheduler) -> None:
        self.sched = sched
        self.order: list[str] = []
        self.grants: dict[str, Grant] = {}
        self.tasks: dict[str, asyncio.Task[Grant]] = {}

    def submit(self, key: str, tool: str, *, memory: int = 1, timeout: float | None = 30) -> None:
        async def one() -> Grant:
            grant = await self.sched.admit(tool, memory_bytes=memory, timeout=timeout)
            self.order.append(key)
            self.grants[key] = grant
            return grant

        self.tasks[key] = asyncio.create_task(one())

    async def settle(self) -> None:
        for _ in range(5):  # granted callers resume on the next loop iterations
            await asyncio.sleep(0)

    async def finish(self, key: str) -> None:
        self.grants[key].release()
        await self.settle()


# -- the scheduler --------------------------------------------------------------------------


def test_admission_limits_must_be_positive():
    with pytest.raises(ValueError, match="max_running_per_tool must be at least 1, not 0"):
        AdmissionLimits(
            max_running=1,
            max_running_per_tool=0,
            max_queued=1,
            max_queued_per_tool=1,
            max_memory_bytes=1,
        )


async def test_a_free_slot_is_granted_at_once_and_given_back():
    sched = scheduler(running=2, per_tool=2)
    grant = await sched.admit("a", memory_bytes=10, timeout=1)
    stats = sched.statistics()
    assert (stats.num_running, stats.num_queued, stats.memory_reserved_bytes) == (1, 0, 10)
    assert stats.running_per_tool == {"a": 1}
    assert grant.waited_s < 0.1
    grant.release()
    grant.release()  # twice is a no-op
    stats = sched.statistics()
    assert (stats.num_running, stats.memory_reserved_bytes, sched.in_flight) == (0, 0, 0)


async def test_one_thread_serves_tools_round_robin_not_in_arrival_order():
    calls = Admitted(scheduler(running=1, per_tool=1))
    for i in range(1, 6):
        calls.submit(f"a{i}", "a")
    calls.submit("b1", "b")
    calls.submit("b2", "b")
    calls.submit("c1", "c")
    await calls.settle()
    assert calls.order == ["a1"]
    assert calls.sched.statistics().queued_per_tool == {"a": 4, "b": 2, "c": 1}
    for key in ["a1", "b1", "c1", "a2", "b2", "a3", "a4"]:
        await calls.finish(key)
    # b and c arrived behind four calls of a, yet each waited for one call only.
    assert calls.order == ["a1", "b1", "c1", "a2", "b2", "a3", "a4", "a5"]


async def test_a_tool_at_its_cap_leaves_the_other_threads_to_other_tools():
    calls = Admitted(scheduler(running=4, per_tool=2))
    for i in range(10):
        calls.submit(f"a{i}", "a")
    await calls.settle()
    assert calls.order == ["a0", "a1"]  # two threads idle, but a is at its cap
    calls.submit("b0", "b")
    calls.submit("c0", "c")
    await calls.settle()
    assert calls.order == ["a0", "a1", "b0", "c0"]  # no wait at all
    stats = calls.sched.statistics()
    assert stats.running_per_tool == {"a": 2, "b": 1, "c": 1}
    assert stats.queued_per_tool == {"a": 8, "b": 0, "c": 0}


async def test_a_free_slot_goes_to_the_tool_with_fewest_running():
    calls = Admitted(scheduler(running=3, per_tool=3))
    for key in ["a0", "a1", "a2", "a3", "b0", "b1"]:
        calls.submit(key, key[0])
    await calls.settle()
    assert calls.order == ["a0", "a1", "a2"]
    await calls.finish("a0")  # a has 2 running, b none: b goes first although a3 came first
    assert calls.order == ["a0", "a1", "a2", "b0"]
    await calls.finish("a1")  # a 1, b 1: the least recently served (a) goes next
    assert calls.order == ["a0", "a1", "a2", "b0", "a3"]
    await calls.finish("a2")
    assert calls.order[-1] == "b1"


async def test_memory_budget_bounds_running_calls_to_budget_over_per_call():
    calls = Admitted(scheduler(running=8, per_tool=8, memory=3 * 100 + 99))
    for i in range(6):
        calls.submit(f"a{i}", "a", memory=100)
    await calls.settle()
    assert calls.order == ["a0", "a1", "a2"]
    stats = calls.sched.statistics()
    assert (stats.num_running, stats.num_queued, stats.memory_reserved_bytes) == (3, 3, 300)
    await calls.finish("a1")
    assert calls.order == ["a0", "a1", "a2", "a3"]
    assert calls.sched.statistics().memory_reserved_bytes == 300


async def test_a_call_waiting_for_memory_is_not_overtaken_by_smaller_ones():
    calls = Admitted(scheduler(running=8, per_tool=8, memory=100))
    calls.submit("a0", "a", memory=60)
    calls.submit("b0", "b", memory=60)
    calls.submit("c0", "c", memory=10)
    await calls.settle()
    assert calls.order == ["a0"]  # c would fit, but b came first and waits for memory
    await calls.finish("a0")
    assert calls.order == ["a0", "b0", "c0"]


async def test_a_call_over_the_whole_budget_is_refused():
    sched = scheduler(memory=100)
    with pytest.raises(ValueError, match="can never fit in the memory budget of 100 bytes"):
        await sched.admit("a", memory_bytes=101, timeout=1)


async def test_queue_bounds_total_and_per_tool():
    calls = Admitted(scheduler(running=1, per_tool=1, queued=3, queued_per_tool=2))
    calls.submit("a0", "a")
    calls.submit("a1", "a")
    calls.submit("a2", "a")
    await calls.settle()
    with raises_tool_error(
        ToolErrorKind.QUEUE_FULL, match="too many calls of tool 'a' waiting \\(2\\)"
    ):
        await calls.sched.admit("a", memory_bytes=1, timeout=1)
    calls.submit("b0", "b")
    await calls.settle()
    with raises_tool_error(ToolErrorKind.QUEUE_FULL, match=r"too many tool calls in flight \(4\)"):
        await calls.sched.admit("c", memory_bytes=1, timeout=1)
    stats = calls.sched.statistics()
    assert (stats.num_rejected, stats.num_queued, stats.num_running) == (2, 3, 1)
    for task in calls.tasks.values():
        task.cancel()
    await calls.settle()


async def test_a_waiting_call_gets_its_deadline_at_the_deadline_and_never_starts():
    calls = Admitted(scheduler(running=1, per_tool=1))
    calls.submit("a0", "a")
    await calls.settle()
    started = time.monotonic()
    with raises_tool_error(ToolErrorKind.DEADLINE, match="'b' waited past its deadline to start"):
        await calls.sched.admit("b", memory_bytes=1, timeout=0.2)
    assert 0.15 < time.monotonic() - started < 1.0
    stats = calls.sched.statistics()
    assert (stats.num_expired, stats.num_queued, stats.running_per_tool["b"]) == (1, 0, 0)
    # A call that must wait with no time left fails at once; one that can start does.
    with raises_tool_error(ToolErrorKind.DEADLINE):
        await calls.sched.admit("b", memory_bytes=1, timeout=0)
    await calls.finish("a0")
    (await calls.sched.admit("b", memory_bytes=1, timeout=0)).release()


async def test_cancelling_a_waiting_caller_removes_its_call():
    calls = Admitted(scheduler(running=1, per_tool=1))
    calls.submit("a0", "a")
    calls.submit("b0", "b")
    calls.submit("c0", "c")
    await calls.settle()
    calls.tasks["b0"].cancel()
    await calls.settle()
    stats = calls.sched.statistics()
    assert (stats.num_queued, stats.num_cancelled) == (1, 1)
    await calls.finish("a0")
    assert calls.order == ["a0", "c0"]  # the cancelled call never got the slot
    assert calls.tasks["b0"].cancelled()


async def test_a_caller_cancelled_just_after_its_grant_gives_the_slot_back():
    sched = scheduler(running=1, per_tool=1)
    first = await sched.admit("a", memory_bytes=1, timeout=5)
    waiting = asyncio.create_task(sched.admit("b", memory_bytes=1, timeout=5))
    await asyncio.sleep(0)
    first.release()  # grants b's future, but the task has not resumed yet
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert sched.in_flight == 0
    (await sched.admit("c", memory_bytes=1, timeout=0)).release()


async def test_close_answers_every_waiting_caller_and_refuses_new_ones():
    calls = Admitted(scheduler(running=1, per_tool=1))
    for key in ["a0", "a1", "b0", "c0"]:
        calls.submit(key, key[0])
    await calls.settle()
    calls.sched.close("shutting down")
    results = await asyncio.wait_for(
        asyncio.gather(*calls.tasks.values(), return_exceptions=True), timeout=1
    )
    assert isinstance(results[0], Grant)
    for error in results[1:]:
        assert is_tool_error(error, ToolErrorKind.UNAVAILABLE)
        assert error.message == "tools are unavailable: shutting down"
    with raises_tool_error(ToolErrorKind.UNAVAILABLE, match="shutting down"):
        await calls.sched.admit("a", memory_bytes=1, timeout=1)
    calls.grants["a0"].release()  # a running call gives its slot back as usual
    assert calls.sched.in_flight == 0


# -- the service over a fake runtime --------------------------------------------------------


def spec(name: str) -> ToolSpec:
    return ToolSpec(name, "", {"type": "object", "properties": {}})


class SleepingRuntime:
    """A ToolRuntime whose calls take ``seconds[name]``; records starts and, per tool, the
    most calls running at once."""

    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds = seconds
        self.started: list[tuple[str, float]] = []
        self.running: dict[str, int] = dict.fromkeys(seconds, 0)
        self.peak: dict[str, int] = dict.fromkeys(seconds, 0)
        self._lock = threading.Lock()

    def call(self, name, arguments_json, *, deadline=None):
        with self._lock:
            self.started.append((name, time.monotonic()))
            self.running[name] += 1
            self.peak[name] = max(self.peak[name], self.running[name])
        try:
            time.sleep(self.seconds[name])
        finally:
            with self._lock:
                self.running[name] -= 1
        return CallOutcome(f'"{name}"', None, 1)

    def refill(self) -> None:
        pass

    def close(self) -> None:
        pass

    def names_started(self) -> list[str]:
        return [name for name, _ in self.started]


async def open_service(runtime: SleepingRuntime, **options) -> ToolService:
    options.setdefault("limits", ToolLimits(timeout_s=10))
    svc = ToolService([spec(name) for name in runtime.seconds], lambda: runtime, **options)
    await svc.start()
    return svc


async def test_a_flood_of_one_tool_does_not_delay_another_tools_call():
    runtime = SleepingRuntime({"slow": 0.1, "fast": 0.0})
    svc = await open_service(runtime, threads=2)  # per-tool cap: 1
    try:
        flood = [asyncio.create_task(svc.call("slow")) for _ in range(20)]
        await asyncio.sleep(0.05)
        started = time.monotonic()
        assert await svc.call("fast") == "fast"
        waited = time.monotonic() - started
        assert not all(task.done() for task in flood)
        assert await asyncio.gather(*flood) == ["slow"] * 20
    finally:
        await svc.aclose()
    assert waited < 0.1  # a thread was free: the flood holds one of two
    assert runtime.peak["slow"] == 1  # the flood never held both threads


async def test_with_the_cap_at_all_threads_another_tool_waits_one_call_at_most():
    runtime = SleepingRuntime({"slow": 0.2, "fast": 0.0})
    svc = await open_service(runtime, threads=2, max_running_per_tool=2)
    try:
        flood = [asyncio.create_task(svc.call("slow")) for _ in range(12)]
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await svc.call("fast")
        waited = time.monotonic() - started
        await asyncio.gather(*flood)
    finally:
        await svc.aclose()
    # The fast call took the first thread to free (about one slow call), not the 6th round.
    assert waited < 0.6
    assert runtime.names_started().index("fast") == 2


async def test_the_memory_budget_caps_calls_running_at_once():
    runtime = SleepingRuntime({"big": 0.1})
    limits = ToolLimits(timeout_s=10, max_memory_bytes=100 * MiB)
    svc = await open_service(
        runtime,
        limits=limits,
        threads=8,
        max_running_per_tool=8,
        max_total_memory_bytes=350 * MiB,
    )
    try:
        calls = [asyncio.create_task(svc.call("big")) for _ in range(12)]
        await asyncio.sleep(0.02)
        assert svc.statistics().memory_reserved_bytes == 300 * MiB
        await asyncio.gather(*calls)
    finally:
        await svc.aclose()
    assert runtime.peak["big"] == 3
    assert len(runtime.started) == 12


def test_a_per_call_memory_limit_over_the_budget_is_refused():
    with pytest.raises(ValueError, match="no call could run"):
        ToolService(
            [],
            None,
            limits=ToolLimits(max_memory_bytes=2 * MiB),
            max_total_memory_bytes=MiB,
        )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_running_per_tool": 0}, "max_running_per_tool must be at least 1, not 0"),
        ({"max_queued_per_tool": 0}, "max_queued_per_tool must be at least 1, not 0"),
        ({"max_total_memory_bytes": 0}, "no call could run"),
    ],
)
def test_a_zero_bound_is_refused_not_read_as_the_default(options, message):
    with pytest.raises(ValueError, match=message):
        ToolService([], None, limits=ToolLimits(), **options)


async def test_service_deadline_in_the_queue_and_the_call_never_runs():
    runtime = SleepingRuntime({"slow": 0.6, "quick": 0.0})
    svc = await open_service(runtime, threads=1)
    try:
        running = asyncio.create_task(svc.call("slow"))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        with raises_tool_error(ToolErrorKind.DEADLINE, match="waited past its deadline to start"):
            await svc.call("quick", timeout=0.15)
        assert time.monotonic() - started < 0.45
        assert await running == "slow"
    finally:
        await svc.aclose()
    assert runtime.names_started() == ["slow"]


async def test_service_cancelled_waiting_call_never_runs():
    runtime = SleepingRuntime({"slow": 0.2, "quick": 0.0})
    svc = await open_service(runtime, threads=1)
    try:
        running = asyncio.create_task(svc.call("slow"))
        queued = asyncio.create_task(svc.call("quick"))
        await asyncio.sleep(0.05)
        assert svc.in_flight == 2
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert svc.in_flight == 1
        await running
    finally:
        await svc.aclose()
    assert runtime.names_started() == ["slow"]


async def test_aclose_answers_every_waiting_caller_unavailable_and_none_hangs():
    runtime = SleepingRuntime({"slow": 0.3, "quick": 0.0})
    svc = await open_service(runtime, threads=1)
    running = asyncio.create_task(svc.call("slow"))
    waiting = [asyncio.create_task(svc.call(name)) for name in ["quick", "slow", "quick"]]
    await asyncio.sleep(0.05)
    closing = asyncio.create_task(svc.aclose())
    results = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 1)
    for error in results:
        assert is_tool_error(error, ToolErrorKind.UNAVAILABLE)
        assert "the tool service is shut down" in error.message
    assert await asyncio.wait_for(running, 2) == "slow"  # a running call ends as usual
    await asyncio.wait_for(closing, 2)
    assert runtime.names_started() == ["slow"]
    with raises_tool_error(ToolErrorKind.UNAVAILABLE):
        await svc.call("quick")


async def test_admission_metrics():
    metrics = Metrics()
    runtime = SleepingRuntime({"slow": 0.2, "quick": 0.0})
    svc = await open_service(runtime, threads=1, max_queued=1, observer=metrics)
    try:
        running = asyncio.create_task(svc.call("slow"))
        queued = asyncio.create_task(svc.call("quick"))
        await asyncio.sleep(0.05)
        with raises_tool_error(ToolErrorKind.QUEUE_FULL):
            await svc.call("quick")
        text = metrics.render()[0].decode()
        assert 'agentd_tool_calls_queued{tool="quick"} 1.0' in text
        assert 'agentd_tool_calls_running{tool="slow"} 1.0' in text
        assert "agentd_tool_memory_reserved_bytes 1.34217728e+08" in text
        assert "agentd_tool_queue_rejections_total 1.0" in text
        await asyncio.gather(running, queued)
    finally:
        await svc.aclose()
    text = metrics.render()[0].decode()
    assert 'agentd_tool_calls_queued{tool="quick"} 0.0' in text
    assert 'agentd_tool_queue_wait_seconds_count{tool="quick"} 1.0' in text
    assert 'agentd_tool_queue_wait_seconds_count{tool="slow"} 1.0' in text
    assert 'agentd_tool_calls_total{outcome="queue_full",tool="quick"} 1.0' in text


# -- settings --------------------------------------------------------------------------------


def test_settings_reach_the_service(tmp_path, monkeypatch):
    defaults = load_settings(tools_cache_dir=tmp_path, plugins=tmp_path, tool_threads=8)
    assert open_tool_service(defaults).admission_limits == AdmissionLimits(
        max_running=8,
        max_running_per_tool=4,  # half the threads
        max_queued=4096,
        max_queued_per_tool=1024,
        max_memory_bytes=1024 * MiB,
    )
    monkeypatch.setenv("AGENTD_TOOL_MAX_RUNNING_PER_TOOL", "3")
    monkeypatch.setenv("AGENTD_TOOL_MAX_QUEUED_PER_TOOL", "7")
    monkeypatch.setenv("AGENTD_TOOL_MAX_TOTAL_MEMORY_BYTES", str(512 * MiB))
    settings = load_settings(tools_cache_dir=tmp_path, plugins=tmp_path, tool_threads=8)
    assert open_tool_service(settings).admission_limits == AdmissionLimits(
        max_running=8,
        max_running_per_tool=3,
        max_queued=4096,
        max_queued_per_tool=7,
        max_memory_bytes=512 * MiB,
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            {"tool_max_memory_bytes": 2048 * MiB},
            r"tool_max_memory_bytes \(2,147,483,648\) is larger than "
            r"tool_max_total_memory_bytes \(1,073,741,824\): no tool call could run",
        ),
        ({"tool_max_total_memory_bytes": 0}, "greater than 0"),
        ({"tool_max_running_per_tool": 0}, "greater than 0"),
        ({"tool_max_queued_per_tool": -1}, "greater than 0"),
    ],
)
def test_invalid_admission_settings(flags, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(**flags)
