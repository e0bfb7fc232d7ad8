"""The tool service: validation, thread pool, limits, backpressure, cancellation, metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from agentd.observability import Metrics
from agentd.tools import CallOutcome, ToolErrorKind, ToolLimits, ToolSpec
from agentd.tools.components import open_components
from agentd.tools.service import ToolService
from tests.tools.support import LIMITS, is_tool_error, raises_tool_error


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int]] = []

    def tool_call_finished(self, tool: str, outcome: str, seconds: float, fuel: int) -> None:
        self.calls.append((tool, outcome, fuel))


def make_service(artefact, *, limits=LIMITS, threads=2, max_queued=256, observer=None):
    return ToolService(
        artefact.tools,
        lambda: open_components(artefact, limits, pool_size=2),
        limits=limits,
        threads=threads,
        max_queued=max_queued,
        observer=observer,
    )


@pytest.fixture
async def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def service(artefact, recorder) -> AsyncIterator[ToolService]:
    svc = make_service(artefact, observer=recorder)
    await svc.start()
    yield svc
    await svc.aclose()


async def test_lists_tools_sorted_with_specs(service):
    names = [t.name for t in service.list_tools()]
    assert names == sorted(names)
    assert service.spec("calc").parameters["required"] == ["expression"]


async def test_call_returns_parsed_json_and_call_json_the_text(service, recorder):
    assert await service.call("calc", {"expression": "2 ** 8"}) == 256
    assert await service.call_json("add", '{"a": 1, "b": 2}') == "3"
    assert await service.call_json("add", b'{"a": 5}') == "6"
    tool, outcome, fuel = recorder.calls[0]
    assert (tool, outcome) == ("calc", "ok")
    assert fuel > 0


async def test_unknown_tool_and_bad_arguments_fail_before_any_sandbox(service, recorder):
    with raises_tool_error(ToolErrorKind.NOT_FOUND, match="no tool named 'nope'"):
        await service.call("nope", {})
    with raises_tool_error(
        ToolErrorKind.INVALID_ARGUMENTS, match="argument 'a' must be an integer, not string"
    ):
        await service.call("add", {"a": "1"})
    with raises_tool_error(ToolErrorKind.INVALID_ARGUMENTS, match="not valid JSON"):
        await service.call_json("add", "{oops")
    with raises_tool_error(ToolErrorKind.INVALID_ARGUMENTS, match="not JSON-serialisable"):
        await service.call("echo", {"value": object()})
    with raises_tool_error(
        ToolErrorKind.INPUT_TOO_LARGE, match="larger than the limit of 65,536 bytes"
    ):
        await service.call("echo", {"value": "x" * 70_000})
    assert recorder.calls == [
        ("unknown", "not_found", 0),
        ("add", "invalid_arguments", 0),
        ("add", "invalid_arguments", 0),
        ("echo", "invalid_arguments", 0),
        ("echo", "input_too_large", 0),
    ]


async def test_a_long_tool_does_not_block_the_event_loop(service):
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    try:
        with raises_tool_error(ToolErrorKind.OUT_OF_FUEL):
            await service.call("loop_forever")
    finally:
        tick.cancel()
    assert len(gaps) > 5
    assert max(gaps) < 0.1


async def test_hundred_concurrent_calls_with_a_hostile_one(service):
    calls = [service.call("add", {"a": i, "b": 1}) for i in range(99)]
    calls.insert(50, service.call("loop_forever"))
    started = time.monotonic()
    results = await asyncio.gather(*calls, return_exceptions=True)
    elapsed = time.monotonic() - started
    hostile = results.pop(50)
    assert is_tool_error(hostile, ToolErrorKind.OUT_OF_FUEL)
    assert results == [i + 1 for i in range(99)]
    assert elapsed < 10
    assert service.in_flight == 0


async def test_timeout_shorter_than_the_limit(artefact):
    svc = make_service(artefact, limits=ToolLimits(max_fuel=10**15, timeout_s=5.0))
    await svc.start()
    try:
        started = time.monotonic()
        # The sandbox names the time the call had left when it started (0.2 s, or a little
        # less on a loaded machine: "0.19 s").
        with raises_tool_error(ToolErrorKind.DEADLINE, match=r"did not finish within 0\.(2|1\d) s"):
            await svc.call("loop_forever", timeout=0.2)
        assert time.monotonic() - started < 1.0
    finally:
        await svc.aclose()


async def test_full_queue_pushes_back_and_queued_calls_can_be_cancelled(artefact, recorder):
    limits = ToolLimits(max_fuel=10**15, timeout_s=1.0)
    svc = make_service(artefact, limits=limits, threads=1, max_queued=1, observer=recorder)
    await svc.start()
    try:
        running = asyncio.create_task(svc.call("loop_forever"))
        queued = asyncio.create_task(svc.call("count_calls"))
        await asyncio.sleep(0.05)
        with raises_tool_error(ToolErrorKind.QUEUE_FULL, match="too many tool calls in flight"):
            await svc.call("count_calls")
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        with raises_tool_error(ToolErrorKind.DEADLINE):
            await running
    finally:
        await svc.aclose()
    outcomes = [(tool, outcome) for tool, outcome, _ in recorder.calls]
    assert ("count_calls", "queue_full") in outcomes
    assert ("count_calls", "cancelled") in outcomes
    assert ("count_calls", "ok") not in outcomes  # the cancelled call never ran
    assert ("loop_forever", "deadline") in outcomes


async def test_without_a_component_calls_are_unavailable():
    svc = ToolService([], None, limits=LIMITS, unavailable_reason="not built")
    await svc.start()
    assert svc.list_tools() == []
    assert not svc.available
    with raises_tool_error(ToolErrorKind.UNAVAILABLE, match="tools are unavailable: not built"):
        await svc.call("calc", {"expression": "1"})
    await svc.aclose()


async def test_closed_service_refuses_calls(artefact):
    svc = make_service(artefact)
    await svc.start()
    assert await svc.call("add", {"a": 1}) == 2
    await svc.aclose()
    with raises_tool_error(ToolErrorKind.UNAVAILABLE):
        await svc.call("add", {"a": 1})


async def test_metrics_count_calls_errors_duration_and_fuel(artefact):
    metrics = Metrics()
    svc = make_service(artefact, observer=metrics)
    await svc.start()
    try:
        await svc.call("add", {"a": 1})
        with raises_tool_error(ToolErrorKind.RAISED):
            await svc.call("raise_error")
        with raises_tool_error(ToolErrorKind.OUT_OF_FUEL):
            await svc.call("loop_forever")
    finally:
        await svc.aclose()
    text = metrics.render()[0].decode()
    assert 'agentd_tool_calls_total{outcome="ok",tool="add"} 1.0' in text
    assert 'agentd_tool_errors_total{kind="raised",tool="raise_error"} 1.0' in text
    assert 'agentd_tool_errors_total{kind="out_of_fuel",tool="loop_forever"} 1.0' in text
    assert 'agentd_tool_call_duration_seconds_count{tool="add"} 1.0' in text
    assert 'agentd_tool_fuel_used_sum{tool="loop_forever"} 1e+09' in text


class BlockedInHostCall:
    """A runtime whose call blocks like a host call the epoch deadline cannot interrupt
    (the guest refuses sleep, but the service must not rely on that)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def call(self, name, arguments_json, *, deadline=None):
        time.sleep(self.seconds)
        return CallOutcome("null", None, 0)

    def refill(self) -> None:
        pass

    def close(self) -> None:
        pass


async def test_caller_gets_its_deadline_even_when_the_call_is_stuck():
    spec = ToolSpec("stuck", "", {"type": "object", "properties": {}})
    limits = ToolLimits(timeout_s=0.2)
    svc = ToolService([spec], lambda: BlockedInHostCall(0.8), limits=limits, threads=1)
    await svc.start()
    try:
        started = time.monotonic()
        with raises_tool_error(ToolErrorKind.DEADLINE, match=r"did not finish within 0\.2 s"):
            await svc.call("stuck")
        assert time.monotonic() - started < 0.6
        assert svc.in_flight == 1  # its thread is still held, and admission counts it
        while svc.in_flight:
            await asyncio.sleep(0.05)
    finally:
        await svc.aclose()
