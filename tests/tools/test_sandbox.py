"""Hostile and careless tools against the real sandbox: each ends in its own clear error,
within its limit, and the sandbox keeps serving."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from agentd.errors import Code
from agentd.tools import ToolError, ToolErrorKind, ToolLimits
from agentd.tools.sandbox import SandboxEngine, WasmSandbox
from tests.tools.support import LIMITS, is_tool_error

HOSTILE = [
    # tool, error kind, message fragment
    (
        "read_passwd",
        ToolErrorKind.RAISED,
        "FileNotFoundError: [Errno 44] No such file or directory",
    ),
    ("list_root", ToolErrorKind.RAISED, "FileNotFoundError"),
    ("open_socket", ToolErrorKind.RAISED, "PermissionError"),
    (
        "loop_forever",
        ToolErrorKind.OUT_OF_FUEL,
        "ran out of fuel (CPU budget of 1,000,000,000 units)",
    ),
    ("allocate_4gib", ToolErrorKind.OUT_OF_MEMORY, "ran out of memory (limit 268,435,456 bytes)"),
    ("allocate_at_once", ToolErrorKind.OUT_OF_MEMORY, "ran out of memory"),
    ("recurse", ToolErrorKind.STACK_OVERFLOW, "recursed too deeply (RecursionError"),
    ("deep_json", ToolErrorKind.STACK_OVERFLOW, "exhausted its stack"),
    ("return_100mb", ToolErrorKind.OUTPUT_TOO_LARGE, "more than the output limit of 65,536 bytes"),
    ("raise_error", ToolErrorKind.RAISED, "raised ValueError: this tool always fails"),
    ("return_set", ToolErrorKind.BAD_RESULT, "not JSON: TypeError: Object of type set"),
    ("os_system", ToolErrorKind.RAISED, "AttributeError: module 'os' has no attribute 'system'"),
    (
        "sleep_long",
        ToolErrorKind.RAISED,
        "PermissionError: waiting is not allowed in the tool sandbox",
    ),
    ("recreate_time", ToolErrorKind.RAISED, "AttributeError"),
    ("exit_process", ToolErrorKind.RAISED, "raised SystemExit: 3"),
]


@pytest.mark.parametrize(("tool", "kind", "fragment"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_tool_gets_its_error_within_its_limits(sandbox, tool, kind, fragment):
    started = time.monotonic()
    outcome = sandbox.call(tool, "{}")
    elapsed = time.monotonic() - started
    assert outcome.result_json is None
    assert is_tool_error(outcome.error, kind), outcome.error
    assert fragment in outcome.error.message
    assert outcome.error.message.startswith(f"tool {tool!r}")
    assert elapsed < LIMITS.timeout_s
    assert outcome.fuel_used <= LIMITS.max_fuel
    # ... and the sandbox still serves the next call.
    assert sandbox.call("calc", '{"expression": "2 + 2"}').result_json == "4"


def test_error_codes_tell_the_causes_apart(sandbox):
    codes = {t: sandbox.call(t, "{}").error.code for t in ("raise_error", "loop_forever")}
    assert codes == {"raise_error": Code.UNKNOWN, "loop_forever": Code.RESOURCE_EXHAUSTED}
    assert ToolError(ToolErrorKind.DEADLINE, "x").code is Code.DEADLINE_EXCEEDED
    assert ToolError(ToolErrorKind.NOT_FOUND, "x").code is Code.NOT_FOUND
    assert ToolError(ToolErrorKind.INVALID_ARGUMENTS, "x").code is Code.INVALID_ARGUMENT


def test_no_environment_files_or_network(sandbox):
    assert sandbox.call("read_env", "{}").result_json == "{}"


def test_deadline_stops_a_loop_that_has_fuel_to_spare(artefact):
    limits = ToolLimits(max_fuel=10**15, timeout_s=0.3)
    box = WasmSandbox(artefact.owner("loop_forever").component_path, limits)
    try:
        started = time.monotonic()
        outcome = box.call("loop_forever", "{}")
        elapsed = time.monotonic() - started
    finally:
        box.close()
    assert is_tool_error(outcome.error, ToolErrorKind.DEADLINE)
    assert outcome.error.message == "tool 'loop_forever' did not finish within 0.3 s"
    assert 0.25 < elapsed < 1.0


def test_a_caller_deadline_shorter_than_the_limit_wins(sandbox):
    outcome = sandbox.call("spin", '{"iterations": 100000000}', deadline=time.monotonic() + 0.05)
    assert is_tool_error(outcome.error, ToolErrorKind.DEADLINE, ToolErrorKind.OUT_OF_FUEL)
    late = sandbox.call("calc", '{"expression": "1"}', deadline=time.monotonic() - 1)
    assert is_tool_error(late.error, ToolErrorKind.DEADLINE)
    assert late.fuel_used == 0


def test_every_call_gets_a_fresh_instance(sandbox):
    assert [sandbox.call("count_calls", "{}").result_json for _ in range(3)] == ["1", "1", "1"]
    draws = {sandbox.call("rand", "{}").result_json for _ in range(3)}
    assert len(draws) == 3  # the PRNG is reseeded per call, not replayed from the snapshot


def test_results_and_arguments_are_json(sandbox):
    value = {"a": [1, 2.5, None, True, "ü"], "b": {"c": "d"}}
    out = sandbox.call("echo", json.dumps({"value": value}))
    assert json.loads(out.result_json) == value
    assert sandbox.call("add", '{"a": 2, "b": 3}').result_json == "5"
    assert sandbox.call("options", '{"x": 1}').result_json == '{"x":1}'


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        ("not json", "arguments are not JSON"),
        ("[1, 2]", "arguments must be a JSON object"),
        ('{"b": 2}', "missing a required argument: 'a'"),
        ('{"a": 1, "c": 2}', "unexpected keyword argument 'c'"),
    ],
)
def test_bad_arguments_are_invalid_argument(sandbox, arguments, fragment):
    error = sandbox.call("add", arguments).error
    assert is_tool_error(error, ToolErrorKind.INVALID_ARGUMENTS)
    assert fragment in error.message


def test_unknown_tool_is_not_found(sandbox):
    error = sandbox.call("no_such_tool", "{}").error
    assert is_tool_error(error, ToolErrorKind.NOT_FOUND)
    assert error.message == "no tool named 'no_such_tool'"


def test_prepared_instances_are_used_and_refilled(artefact):
    box = WasmSandbox(artefact.owner("count_calls").component_path, LIMITS, pool_size=2)
    try:
        box.refill()
        assert len(box._ready) == 2
        assert box.call("count_calls", "{}").result_json == "1"
        assert len(box._ready) == 1
        box.refill()
        assert len(box._ready) == 2
    finally:
        box.close()


def test_components_share_one_engine_and_one_ticker(artefact):
    def tickers() -> int:
        return sum(t.name == "agentd-tool-epoch" for t in threading.enumerate())

    before = tickers()
    engine = SandboxEngine(max_instances=8, max_memory_bytes=LIMITS.max_memory_bytes)
    paths = [artefact.owner("echo").component_path, artefact.owner("loop_forever").component_path]
    boxes = [WasmSandbox(path, LIMITS, pool_size=1, engine=engine) for path in paths]
    try:
        assert tickers() == before + 1
        assert boxes[0].call("echo", '{"value": 1}').result_json == "1"
        # The shared ticker drives every component's deadline.
        slow = boxes[1].call("loop_forever", "{}", deadline=time.monotonic() + 0.2)
        assert is_tool_error(slow.error, ToolErrorKind.DEADLINE, ToolErrorKind.OUT_OF_FUEL)
    finally:
        for box in boxes:
            box.close()
        engine.close()
    assert tickers() == before


def test_the_pool_holds_as_many_instances_as_it_was_sized_for(artefact):
    path = artefact.owner("echo").component_path
    engine = SandboxEngine(max_instances=2, max_memory_bytes=LIMITS.max_memory_bytes)
    prepared = WasmSandbox(path, LIMITS, pool_size=2, engine=engine)
    other = WasmSandbox(path, LIMITS, engine=engine)
    try:
        prepared.refill()  # both slots taken by prepared instances
        refused = other.call("echo", '{"value": 1}').error
        assert refused.message == (
            "tool 'echo': cannot start a sandbox: all 2 sandbox slots are in use "
            "(more calls at once than the engine was sized for)"
        )
        assert prepared.call("echo", '{"value": 2}').result_json == "2"  # frees its slot
        assert other.call("echo", '{"value": 3}').result_json == "3"
    finally:
        prepared.close()
        other.close()
        engine.close()


def test_an_engine_is_sized_from_the_settings():
    engine = SandboxEngine.for_node(LIMITS, threads=8, pool_size=2, components=3)
    try:
        assert engine.max_instances == 8 + 2 * 3 + 2
        assert engine.max_memory_bytes == LIMITS.max_memory_bytes
    finally:
        engine.close()


def test_a_limited_address_space_gets_instances_on_demand_not_a_crash(artefact):
    # wasmtime aborts the process when it cannot reserve its pool (about 4 GiB of address
    # space per slot); under `ulimit -v` the engine allocates on demand instead.
    script = (
        "import logging, resource, sys\n"
        "logging.basicConfig()\n"
        "resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30))\n"
        "from pathlib import Path\n"
        "from agentd.tools.sandbox import WasmSandbox\n"
        "from agentd.tools.types import ToolLimits\n"
        "box = WasmSandbox(Path(sys.argv[1]), ToolLimits())\n"
        "print(box.call('echo', '{\"value\": 5}').result_json)\n"
        "box.close()\n"
    )
    path = str(artefact.owner("echo").component_path)
    done = subprocess.run(
        [sys.executable, "-c", script, path], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "5"
    assert "instances are allocated on demand" in done.stderr
