"""The host side of "a tool cannot wait": WASI's clock waits fail at once, whatever the guest.

The guest refuses ``time.sleep``/``select`` and seals the import machinery, but that is
Python inside the sandbox and a tool may find a way around it. These tests take the guest
out of the picture: they build a component from a bare guest (``BARE_GUEST`` below) that
seals nothing and calls the real ``time.sleep``, ``select.select``, ``select.poll``, the
selectors, thread waits with timeouts and queue timeouts: every route CPython has to
``wasi:clocks/monotonic-clock`` ``subscribe-*`` and ``wasi:io/poll``. Before the host
refused those, ``time.sleep(1e6)`` held its thread for 11 days, and an epoch deadline
cannot stop it (it interrupts WebAssembly code, not a host call in progress). Each case
must end within its deadline with the one tool thread free for the next call.
"""

from __future__ import annotations

import gc
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest

from agentd.tools.errors import ToolErrorKind
from agentd.tools.sandbox import MAX_CLOCK_READS, WasmSandbox, compile_component
from agentd.tools.source import WIT_DIR
from agentd.tools.types import CallOutcome, ToolLimits
from tests.tools.support import is_tool_error

LIMITS = ToolLimits(
    max_fuel=2_000_000_000,
    max_memory_bytes=128 * 1024 * 1024,
    timeout_s=2.0,
    max_output_bytes=64 * 1024,
    max_input_bytes=64 * 1024,
)
# A call ends at its deadline plus an epoch; the rest is a loaded 2-core machine.
WITHIN_DEADLINE_S = LIMITS.timeout_s + 2.0

# The tools world with nothing sealed or patched: each "tool" is a route to a wait.
BARE_GUEST = """
import json, queue, select, selectors, socket, sys, threading, time
import wit_world
from componentize_py_types import Err


def _wait(kind, seconds):
    if kind == "sleep":
        time.sleep(seconds)
    elif kind == "select":
        select.select([], [], [], seconds)
    elif kind == "poll":
        select.poll().poll(int(seconds * 1000))
    elif kind == "poll_stdin":
        p = select.poll()
        p.register(0, select.POLLIN)
        p.poll(int(seconds * 1000))
    elif kind == "selector":
        selectors.DefaultSelector().select(seconds)
    elif kind == "event":
        threading.Event().wait(seconds)
    elif kind == "lock":
        lock = threading.Lock()
        lock.acquire()
        lock.acquire(timeout=seconds)
    elif kind == "condition":
        with threading.Condition() as condition:
            condition.wait(seconds)
    elif kind == "queue":
        queue.Queue().get(timeout=seconds)
    elif kind == "socket":
        s = socket.socket()
        s.settimeout(seconds)
        s.connect(("10.255.255.1", 9))
    elif kind == "stdin":
        sys.stdin.read()
    elif kind == "clock":
        return [time.monotonic() for _ in range(int(seconds))][-1]
    elif kind == "echo":
        return seconds
    else:
        raise ValueError(kind)
    return "returned"


class WitWorld(wit_world.WitWorld):
    def list_tools(self):
        return []

    def load_errors(self):
        return []

    def call(self, name, arguments_json, max_output_bytes):
        try:
            return json.dumps(_wait(name, json.loads(arguments_json)["seconds"]))
        except BaseException as exc:
            raise Err(wit_world.CallError_Raised(f"{type(exc).__name__}: {exc}"))
"""

# Each wait either ends at once without waiting (nothing to wait for) or stops the call.
WAITS = [
    "sleep",
    "select",
    "poll",
    "poll_stdin",
    "selector",
    "event",
    "lock",
    "condition",
    "queue",
    "socket",
    "stdin",
]


def _componentize(stage: Path, out: Path) -> None:
    # As `agentd tools build` does: componentize-py mounts $VIRTUAL_ENV's site-packages into
    # the build, so it gets an empty scratch one, never the host's.
    scratch = stage.parent / "scratch-env"
    (scratch / "lib" / "site-packages").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["VIRTUAL_ENV"] = str(scratch)
    script = (
        "import sys; from componentize_py import script; "
        "sys.argv[0] = 'componentize-py'; sys.exit(script())"
    )
    command = [sys.executable, "-c", script, "-d", str(WIT_DIR), "-w", "tools"]
    command += ["componentize", "-p", str(stage), "bare_guest", "-o", str(out)]
    done = subprocess.run(command, cwd=stage, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def bare_component(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("bare-guest")
    stage = work / "stage"
    stage.mkdir()
    (stage / "bare_guest.py").write_text(BARE_GUEST, encoding="utf-8")
    _componentize(stage, work / "bare.wasm")
    native = work / "bare.cwasm"
    native.write_bytes(compile_component((work / "bare.wasm").read_bytes()))
    return native


class OneToolThread:
    """A single daemon thread running calls in order: the smallest tool thread pool. Daemon,
    so that a call stuck in a host wait (the failure this file tests for) cannot keep the
    test process from exiting."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[Callable[[], CallOutcome], Future[CallOutcome]]]
        self._jobs = queue.Queue()
        threading.Thread(target=self._run, name="one-tool-thread", daemon=True).start()

    def submit(self, job: Callable[[], CallOutcome]) -> Future[CallOutcome]:
        future: Future[CallOutcome] = Future()
        self._jobs.put((job, future))
        return future

    def _run(self) -> None:
        while True:
            job, future = self._jobs.get()
            try:
                future.set_result(job())
            except BaseException as exc:  # a call reports failures in its outcome
                future.set_exception(exc)


@pytest.fixture(scope="module")
def sandbox(bare_component: Path) -> Iterator[WasmSandbox]:
    box = WasmSandbox(bare_component, LIMITS, pool_size=1)
    yield box
    box.close()


@pytest.fixture(scope="module")
def thread() -> OneToolThread:
    return OneToolThread()


def _call(box: WasmSandbox, tool: str, seconds: float) -> Callable[[], CallOutcome]:
    return lambda: box.call(tool, f'{{"seconds": {seconds}}}')


@pytest.mark.parametrize("tool", WAITS)
def test_a_wait_of_eleven_days_ends_at_once_and_frees_the_thread(sandbox, thread, tool):
    started = time.monotonic()
    waiting = thread.submit(_call(sandbox, tool, 1e6))
    # Not `result(timeout)` alone: the thread must be free for the next call, too.
    outcome = waiting.result(timeout=WITHIN_DEADLINE_S)
    elapsed = time.monotonic() - started
    assert elapsed < WITHIN_DEADLINE_S
    if outcome.error is not None:
        # Stopped by the host (a trap), or an error the guest raised on its own (EOF on a
        # closed stdin, a refused socket): never a deadline, never a wait.
        assert is_tool_error(outcome.error, ToolErrorKind.RAISED), outcome.error
        assert outcome.error.message.startswith(f"tool {tool!r}")
    else:
        assert outcome.result_json in ('"returned"', '""')  # nothing to wait for
    after = time.monotonic()
    echo = thread.submit(_call(sandbox, "echo", 7)).result(timeout=WITHIN_DEADLINE_S)
    assert echo.result_json == "7"
    assert time.monotonic() - after < LIMITS.timeout_s


@pytest.mark.parametrize("tool", ["sleep", "select", "poll", "selector"])
def test_a_clock_wait_is_refused_by_the_host(sandbox, tool):
    # These reach wasi:clocks/monotonic-clock subscribe-duration, which traps: the guest
    # cannot catch it, and the message says why the call stopped.
    outcome = sandbox.call(tool, '{"seconds": 1000000}')
    assert is_tool_error(outcome.error, ToolErrorKind.RAISED)
    assert "waiting is not allowed in the tool sandbox" in outcome.error.message
    assert outcome.error.message.startswith(f"tool {tool!r} was stopped")


def test_a_tool_can_read_the_clock_but_not_spin_on_it(sandbox):
    assert isinstance(float(sandbox.call("clock", '{"seconds": 100}').result_json), float)
    spinning = sandbox.call("clock", f'{{"seconds": {MAX_CLOCK_READS * 50}}}').error
    assert is_tool_error(spinning, ToolErrorKind.RAISED)
    assert f"more than {MAX_CLOCK_READS:,} times" in spinning.message
    # A timeout loop (queue.get) spins on the clock once its waits return at once: it is
    # stopped by the read limit long before its fuel or deadline.
    started = time.monotonic()
    looping = sandbox.call("queue", '{"seconds": 1000000}').error
    assert is_tool_error(looping, ToolErrorKind.RAISED)
    assert time.monotonic() - started < LIMITS.timeout_s


def test_four_waits_at_once_leave_the_other_calls_answered(sandbox):
    # The denial of service: waits on every tool thread. Here they all end at once.
    threads = [OneToolThread() for _ in range(4)]
    started = time.monotonic()
    waits = [t.submit(_call(sandbox, "sleep", 1e6)) for t in threads]
    echoes = [t.submit(_call(sandbox, "echo", i)) for i, t in enumerate(threads)]
    outcomes = [e.result(timeout=WITHIN_DEADLINE_S) for e in echoes]
    assert [o.result_json for o in outcomes] == [
        "0",
        "1",
        "2",
        "3",
    ], [o.error for o in outcomes]
    assert all(is_tool_error(w.result(timeout=1).error, ToolErrorKind.RAISED) for w in waits)
    assert time.monotonic() - started < WITHIN_DEADLINE_S


def test_stopped_calls_give_their_slot_back_at_once(bare_component):
    # Each instance holds one of the engine's pool slots until its store is freed. A trap
    # raised as a Python exception would keep the store in a reference cycle until the
    # garbage collector ran, and enough stopped calls would fill the pool.
    box = WasmSandbox(bare_component, LIMITS)
    gc.disable()
    try:
        errors = [box.call("sleep", '{"seconds": 1000000}').error for _ in range(20)]
    finally:
        gc.enable()
        box.close()
    assert all("waiting is not allowed" in error.message for error in errors), errors
