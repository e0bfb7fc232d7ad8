"""Hostile tool files against the real sandbox: escapes at call time, tampering with other
tools and the guest, leaks between calls, exhaustion. Every case: the caller gets the right
error within its deadline, and the other tools keep answering as built."""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from agentd.testing import RunningServer, start_server
from agentd.tools.build import ToolArtefact, build_tools
from agentd.tools.components import open_components
from agentd.tools.errors import ToolError, ToolErrorKind
from agentd.tools.service import ToolService
from tests.tools.support import LIMITS, cache_dir, is_tool_error

PLUGINS = Path(__file__).parent / "plugins"
# A call ends at its deadline plus an epoch; the rest is a loaded 2-core machine.
WITHIN_DEADLINE_S = LIMITS.timeout_s + 1.5


@pytest.fixture(scope="module")
def artefact() -> ToolArtefact:
    return build_tools(cache_dir(), PLUGINS / "tools").artefact


@pytest.fixture
async def service(artefact: ToolArtefact) -> AsyncIterator[ToolService]:
    tools = ToolService(
        artefact.tools,
        lambda: open_components(artefact, LIMITS, pool_size=1),
        limits=LIMITS,
        threads=2,
    )
    await tools.start()
    yield tools
    await tools.aclose()


async def still_answering(service: ToolService) -> None:
    """The built-in calc and another file's tool answer as built, with no leftovers."""
    assert await service.call("calc", {"expression": "6*7"}) == 42
    assert await service.call("remember", {"value": "fresh"}) == ["fresh"]


async def expect_failure(service: ToolService, name: str, arguments: dict | None = None):
    started = time.monotonic()
    with pytest.raises(ToolError) as caught:
        await service.call(name, arguments or {})
    elapsed = time.monotonic() - started
    assert elapsed < WITHIN_DEADLINE_S, f"{name} took {elapsed:.1f} s"
    return caught.value


ESCAPES = [
    ("write_root_file", {}),
    ("read_host_file", {"path": "/etc/passwd"}),
    ("read_host_file", {"path": str(Path(__file__).resolve())}),
    ("list_cwd", {}),
    ("run_subprocess", {}),
    ("fork", {}),
    ("load_libc", {}),
    ("start_thread", {}),
]


@pytest.mark.parametrize(("tool", "arguments"), ESCAPES, ids=[t for t, _ in ESCAPES])
async def test_call_time_escapes_fail_as_the_tool_raising(service, tool, arguments):
    error = await expect_failure(service, tool, arguments)
    assert is_tool_error(error, ToolErrorKind.RAISED), error  # the tool's own exception, reported
    assert error.message.startswith(f"tool {tool!r} raised "), error.message
    await still_answering(service)


async def test_no_host_environment(service):
    assert await service.call("environment") == {}


async def test_no_network_even_to_loopback(service):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        error = await expect_failure(service, "connect", {"port": port})
        assert is_tool_error(error, ToolErrorKind.RAISED)
        with pytest.raises(TimeoutError):
            listener.accept()  # nothing ever arrived
    await still_answering(service)


WAITS = [
    "sleep_patched",
    "sleep_fresh_time_module",
    "sleep_reloaded_time",
    "sleep_reimported_time",
    "sleep_select",
    "sleep_asyncio",
]


@pytest.mark.parametrize("tool", WAITS)
async def test_no_route_to_a_real_sleep(service, tool):
    error = await expect_failure(service, tool)
    assert not is_tool_error(error, ToolErrorKind.DEADLINE) or "host call" not in error.message
    await still_answering(service)


async def test_waiting_tools_cannot_hold_every_thread(service):
    # Four waits at once on two threads: each fails fast, so the calc call behind them
    # is served well within one deadline.
    import asyncio

    waits = [asyncio.create_task(service.call(tool)) for tool in WAITS[:4]]
    started = time.monotonic()
    assert await service.call("calc", {"expression": "1+1"}) == 2
    assert time.monotonic() - started < WITHIN_DEADLINE_S
    results = await asyncio.gather(*waits, return_exceptions=True)
    assert all(isinstance(r, ToolError) for r in results), results


EXHAUSTION = [
    ("burn", (ToolErrorKind.OUT_OF_FUEL, ToolErrorKind.DEADLINE)),
    ("hoard_memory", (ToolErrorKind.OUT_OF_MEMORY,)),
    ("recurse_deeply", (ToolErrorKind.STACK_OVERFLOW,)),
    ("huge_result", (ToolErrorKind.OUTPUT_TOO_LARGE, ToolErrorKind.OUT_OF_MEMORY)),
]


@pytest.mark.parametrize(("tool", "kinds"), EXHAUSTION, ids=[t for t, _ in EXHAUSTION])
async def test_exhaustion_ends_in_its_own_error(service, tool, kinds):
    error = await expect_failure(service, tool)
    assert is_tool_error(error, *kinds), error
    await still_answering(service)


@pytest.mark.parametrize("tool", ["flood_stdout", "flood_stderr"])
async def test_output_floods_go_nowhere(service, tool):
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    with contextlib.suppress(ToolError):
        await service.call(tool)  # no stdio is granted: the writes vanish or fail
    assert time.monotonic() - started < WITHIN_DEADLINE_S
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert grown_kib < 64 * 1024, f"host grew {grown_kib} KiB"  # 128 MiB were written
    await still_answering(service)


async def test_no_state_survives_a_call(service):
    for value in ("a", "b", "c"):
        assert await service.call("remember", {"value": value}) == [value]


async def test_arguments_do_not_leak_between_concurrent_calls(service):
    import asyncio

    values = [f"v{i}" for i in range(24)]
    results = await asyncio.gather(*(service.call("remember", {"value": v}) for v in values))
    assert results == [[v] for v in values]


async def test_a_tool_file_cannot_change_other_tools_or_their_guest(artefact, service):
    # tamper.py rewrote what it could reach at build time: only its own component.
    report = await service.call("tamper_report")
    assert report["calc"] == "refused: ModuleNotFoundError", report
    assert report["intruder"] == "refused: ModuleNotFoundError", report
    assert report["unseal"].startswith("done") or report["unseal"].startswith("refused")
    await still_answering(service)
    # Every built-in still answers as built.
    assert await service.call("echo", {"value": {"k": [1, 2]}}) == {"k": [1, 2]}
    assert artefact.owner("calc").origin == "builtin"
    assert artefact.owner("tamper_report").origin == "tools/tamper.py"
    assert artefact.owner("remember").origin == "tools/intruder.py"


# -- through a running server ----------------------------------------------------------


@pytest.fixture(scope="module")
def hostile_server(artefact: ToolArtefact) -> Iterator[RunningServer]:
    env = {
        "AGENTD_TOOLS_CACHE_DIR": str(cache_dir()),
        "AGENTD_TOOL_TIMEOUT_S": str(LIMITS.timeout_s),
        "AGENTD_TOOL_MAX_FUEL": str(LIMITS.max_fuel),
        "AGENTD_TOOL_THREADS": "2",
    }
    running = start_server(["--plugins", str(PLUGINS)], env=env)
    yield running
    running.stop()


def test_hostile_calls_over_http_leave_the_server_answering(hostile_server):
    import concurrent.futures

    url = f"{hostile_server.url}/agentd.v1.AgentService/CallTool"

    def call(name: str, arguments: dict) -> httpx.Response:
        with httpx.Client(timeout=30) as client:
            return client.post(url, json={"name": name, "argumentsJson": json.dumps(arguments)})

    hostile = [(tool, {}) for tool in (*WAITS, "burn", "hoard_memory", "recurse_deeply")]
    with concurrent.futures.ThreadPoolExecutor(len(hostile)) as pool:
        answers = list(pool.map(lambda case: call(*case), hostile))
    for (tool, _), answer in zip(hostile, answers, strict=True):
        # The tool's own failure (UNKNOWN: the tool raised) or a limit, never INTERNAL.
        assert answer.json()["code"] in ("unknown", "resource_exhausted"), (tool, answer.text)
        assert answer.json()["message"].startswith(f"tool {tool!r}"), answer.text
    calc = call("calc", {"expression": "6*7"})
    assert calc.status_code == 200 and json.loads(calc.json()["resultJson"]) == 42
    assert "Traceback" not in hostile_server.log()
