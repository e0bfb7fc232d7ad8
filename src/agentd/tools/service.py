"""The protocol-neutral tool service: validate, admit fairly, run off the event loop, observe.

Agents (``ctx.tool``) and the gateway (``ListTools``, ``CallTool``, ``GET /v1/tools``)
call this. It knows nothing of wasmtime: calls wait their turn in a queue per tool
(:class:`~agentd.tools.admission.FairScheduler`: round-robin across tools, a cap per tool, a
total memory budget) and then run on a :class:`ToolRuntime` (the WASM sandbox in production)
on a fixed pool of threads, so a long tool never blocks the event loop, and a flood of one
tool's calls does not hold up another tool's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import orjson

from agentd.tools.admission import AdmissionLimits, AdmissionStats, FairScheduler, Grant
from agentd.tools.errors import ToolError, ToolErrorKind
from agentd.tools.schema import check_arguments
from agentd.tools.types import CallOutcome, ToolLimits, ToolSpec

if TYPE_CHECKING:
    from agentd.observability.spans import Spans

__all__ = ["ToolAdmissionObserver", "ToolObserver", "ToolRuntime", "ToolService"]

log = logging.getLogger(__name__)

# Waiting this long past a call's deadline before deciding it never started: a running call
# ends at its own deadline (the sandbox's epoch check), within about one epoch.
_DEADLINE_GRACE_S = 0.05
# The total memory the running calls may reserve when the caller names no budget.
_DEFAULT_MEMORY_BUDGET = 1024 * 1024 * 1024


class ToolRuntime(Protocol):
    """Runs one call synchronously (on a pool thread) and reports every failure in the
    outcome. ``refill`` prepares instances ahead of calls; ``close`` frees everything."""

    def call(
        self, name: str, arguments_json: str, *, deadline: float | None = None
    ) -> CallOutcome: ...

    def refill(self) -> None: ...

    def close(self) -> None: ...


class ToolObserver(Protocol):
    def tool_call_finished(self, tool: str, outcome: str, seconds: float, fuel: int) -> None: ...


@runtime_checkable
class ToolAdmissionObserver(Protocol):
    """What an observer may also offer (the metrics do): the queue wait of each call that
    starts, and a reader of the admission statistics to sample at scrape time."""

    def tool_call_started(self, tool: str, waited_s: float) -> None: ...

    def watch_tool_admission(self, read: Callable[[], AdmissionStats]) -> None: ...


class ToolService:
    """Tool calls for one node.

    Owns a thread pool of ``threads`` workers, the runtime ``open_runtime`` returns at
    :meth:`start` and the fair scheduler that admits calls to the threads; :meth:`aclose`
    answers every waiting call a ToolError of kind ``unavailable``, lets running calls end
    (each within its deadline) and frees the rest.

    Admission: at most ``threads`` calls run at once, at most ``max_running_per_tool`` of
    one tool (default: half the threads, at least 1), and no more than
    ``max_total_memory_bytes // limits.max_memory_bytes`` (each running call reserves its
    memory limit; default budget 1 GiB, or one call's limit if that is more). Others wait,
    at most ``max_queued`` in all and ``max_queued_per_tool`` per tool (default: no bound
    of its own); more get kind ``queue_full``. Free threads take waiting calls round-robin
    across tools. A waiting call gets kind ``deadline`` at its deadline without running.
    With ``open_runtime=None`` the service lists no tools and every call gets kind
    ``unavailable`` with ``unavailable_reason``. Raises ValueError when one call's memory
    limit is over the budget, or a bound is below 1.
    """

    def __init__(
        self,
        tools: Sequence[ToolSpec],
        open_runtime: Callable[[], ToolRuntime] | None,
        *,
        limits: ToolLimits,
        threads: int = 4,
        max_queued: int = 4096,
        max_running_per_tool: int | None = None,
        max_queued_per_tool: int | None = None,
        max_total_memory_bytes: int | None = None,
        observer: ToolObserver | None = None,
        unavailable_reason: str = "no tool component is loaded",
    ) -> None:
        budget = max_total_memory_bytes
        if budget is None:
            budget = max(_DEFAULT_MEMORY_BUDGET, limits.max_memory_bytes)
        if limits.max_memory_bytes > budget:
            raise ValueError(
                f"the memory limit per tool call ({limits.max_memory_bytes:,} bytes) is larger "
                f"than the total tool memory budget ({budget:,} bytes): no call could run"
            )
        # What is served: the tool specs and the runtime that runs them, switched in one
        # assignment by install() (None while no runtime is loaded).
        self._loaded = _Loaded({spec.name: spec for spec in tools}, None)
        self._closed = False
        self._open_runtime = open_runtime
        self._limits = limits
        self._threads = threads
        self._scheduler = FairScheduler(
            AdmissionLimits(
                max_running=threads,
                max_running_per_tool=(
                    max(1, threads // 2) if max_running_per_tool is None else max_running_per_tool
                ),
                max_queued=max_queued,
                max_queued_per_tool=(
                    max_queued if max_queued_per_tool is None else max_queued_per_tool
                ),
                max_memory_bytes=budget,
            )
        )
        self._observer = observer
        self._admission_observer = observer if isinstance(observer, ToolAdmissionObserver) else None
        if self._admission_observer is not None:
            self._admission_observer.watch_tool_admission(self._scheduler.statistics)
        self._unavailable = unavailable_reason
        self._executor: ThreadPoolExecutor | None = None
        # Tracing on (the node sets it): a ``tool.call`` span per call.
        self.spans: Spans | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Load the runtime and prepare the first instances (off the event loop)."""
        if self._open_runtime is None or self._loaded.runtime is not None or self._closed:
            return
        executor = ThreadPoolExecutor(self._threads, thread_name_prefix="agentd-tool")
        try:
            runtime = await asyncio.wrap_future(executor.submit(self._open_runtime))
        except ToolError as exc:
            executor.shutdown(wait=False)
            self._unavailable = exc.message
            self._loaded = _Loaded({}, None)
            return
        self._executor = executor
        self._loaded = _Loaded(self._loaded.specs, runtime)
        executor.submit(runtime.refill)

    def install(self, tools: Sequence[ToolSpec], runtime: ToolRuntime) -> bool:
        """Serve ``tools`` on ``runtime`` from now on (live reload; call on the event loop).

        The switch is one assignment: a call that has not started on a thread yet runs on
        ``runtime`` (a tool it no longer has answers NOT_FOUND); calls already running on the
        replaced runtime end on it, and it is closed once the last of them is done.
        Admission and limits are unchanged. Returns False (and closes ``runtime``) when the
        service is shut down.
        """
        if self._closed:
            runtime.close()
            return False
        if self._executor is None:  # no runtime loaded at start: the threads start now
            self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix="agentd-tool")
        old, self._loaded = self._loaded, _Loaded({spec.name: spec for spec in tools}, runtime)
        self._executor.submit(self._refill_job)
        if old.retire():  # nothing runs on it: close it off the event loop
            self._executor.submit(old.close)
        return True

    async def aclose(self) -> None:
        executor, old = self._executor, self._loaded
        self._executor = None
        self._closed = True
        self._loaded = _Loaded(old.specs, None)
        self._unavailable = "the tool service is shut down"
        # Every waiting caller is answered now; running calls end by their own deadline.
        self._scheduler.close(self._unavailable)
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
        if old.retire():  # every thread is done: no call runs on it any more
            old.close()

    # -- queries -------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        return self._loaded.runtime is not None

    @property
    def unavailable_reason(self) -> str | None:
        return None if self._loaded.runtime is not None else self._unavailable

    @property
    def in_flight(self) -> int:
        """Calls waiting or running (a call counts until its thread is free)."""
        return self._scheduler.in_flight

    @property
    def admission_limits(self) -> AdmissionLimits:
        return self._scheduler.limits

    def statistics(self) -> AdmissionStats:
        """Calls running and waiting, per tool, memory reserved, calls refused."""
        return self._scheduler.statistics()

    def list_tools(self) -> list[ToolSpec]:
        specs = self._loaded.specs
        return [specs[name] for name in sorted(specs)]

    def spec(self, name: str) -> ToolSpec:
        loaded = self._loaded
        spec = loaded.specs.get(name)
        if spec is None:
            if loaded.runtime is None:
                raise ToolError(
                    ToolErrorKind.UNAVAILABLE, f"tools are unavailable: {self._unavailable}"
                )
            raise ToolError(ToolErrorKind.NOT_FOUND, f"no tool named {name!r}")
        return spec

    # -- calls ---------------------------------------------------------------------------

    async def call(
        self,
        name: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Call tool ``name`` with keyword ``arguments``; return its result (parsed JSON).

        Bounded by the configured limits and by ``timeout`` (seconds), the time waiting for a
        thread included. Raises :class:`ToolError` with its ``kind``: not_found,
        invalid_arguments, raised (the tool raised), out_of_fuel, out_of_memory, deadline,
        queue_full, unavailable (shut down while waiting), ...
        Cancelling the caller removes a call still queued; a running one ends by its
        deadline.
        """
        return orjson.loads(await self.call_json(name, arguments or {}, timeout=timeout))

    async def call_json(
        self,
        name: str,
        arguments: str | bytes | Mapping[str, Any],
        *,
        timeout: float | None = None,
    ) -> str:
        """Like :meth:`call` with the arguments as a JSON text (or a mapping) and the result
        as JSON text (checked to be valid JSON)."""
        spans = self.spans
        if spans is None:
            return await self._call_json(name, arguments, timeout)
        # Tracing on: a ``tool.call`` span, a child of the caller's (turn, request).
        span = spans.tool(name)
        try:
            result = await self._call_json(name, arguments, timeout, span)
        except ToolError as exc:
            spans.tool_done(span, exc.kind)
            raise
        except BaseException:
            spans.tool_done(span, "cancelled")
            raise
        spans.tool_done(span, "ok")
        return result

    async def _call_json(
        self,
        name: str,
        arguments: str | bytes | Mapping[str, Any],
        timeout: float | None,
        span: Any = None,
    ) -> str:
        started = time.perf_counter()
        try:
            spec = self.spec(name)
            arguments_json = self._encode_arguments(spec, arguments)
            if self._executor is None:
                raise ToolError(
                    ToolErrorKind.UNAVAILABLE, f"tools are unavailable: {self._unavailable}"
                )
        except ToolError as exc:
            self._observe(name if name in self._loaded.specs else "unknown", exc.kind, started, 0)
            raise
        outcome = await self._run(name, arguments_json, timeout, started, span)
        if outcome.error is not None:
            raise outcome.error
        assert outcome.result_json is not None
        try:
            orjson.loads(outcome.result_json)
        except orjson.JSONDecodeError as exc:
            raise ToolError(
                ToolErrorKind.BAD_RESULT, f"tool {name!r} returned malformed JSON: {exc}"
            ) from None
        return outcome.result_json

    def _encode_arguments(self, spec: ToolSpec, arguments: str | bytes | Mapping[str, Any]) -> str:
        limit = self._limits.max_input_bytes
        if isinstance(arguments, str | bytes):
            if len(arguments) > limit:
                raise ToolError(
                    ToolErrorKind.INPUT_TOO_LARGE,
                    f"tool {spec.name!r}: arguments are larger than the limit of {limit:,} bytes",
                )
            try:
                parsed = orjson.loads(arguments or b"{}")
            except orjson.JSONDecodeError as exc:
                raise ToolError(
                    ToolErrorKind.INVALID_ARGUMENTS,
                    f"tool {spec.name!r}: arguments are not valid JSON: {exc}",
                ) from None
            check_arguments(spec, parsed)
            if isinstance(arguments, bytes):
                return arguments.decode() if arguments else "{}"
            return arguments or "{}"
        check_arguments(spec, arguments)
        try:
            encoded = orjson.dumps(arguments)
        except TypeError as exc:
            raise ToolError(
                ToolErrorKind.INVALID_ARGUMENTS,
                f"tool {spec.name!r}: arguments are not JSON-serialisable: {exc}",
            ) from None
        if len(encoded) > limit:
            raise ToolError(
                ToolErrorKind.INPUT_TOO_LARGE,
                f"tool {spec.name!r}: arguments are larger than the limit of {limit:,} bytes",
            )
        return encoded.decode()

    async def _run(
        self, name: str, arguments_json: str, timeout: float | None, started: float, span: Any
    ) -> CallOutcome:
        budget = self._limits.timeout_s
        if timeout is not None:
            budget = min(budget, max(0.0, timeout))
        deadline = time.monotonic() + budget
        try:
            grant = await self._scheduler.admit(
                name, memory_bytes=self._limits.max_memory_bytes, timeout=budget
            )
        except asyncio.CancelledError:
            self._observe(name, "cancelled", started, 0)
            raise
        except ToolError as exc:  # queue full, deadline while waiting, shut down
            self._observe(name, exc.kind, started, 0)
            raise
        if self._admission_observer is not None:
            self._admission_observer.tool_call_started(name, grant.waited_s)
        return await self._run_admitted(
            name, arguments_json, grant, budget, deadline, started, span
        )

    async def _run_admitted(
        self,
        name: str,
        arguments_json: str,
        grant: Grant,
        budget: float,
        deadline: float,
        started: float,
        span: Any,
    ) -> CallOutcome:
        executor = self._executor
        if executor is None:  # shut down between the grant and now
            grant.release()
            return self._shut_down(name, started)
        loop = asyncio.get_running_loop()
        try:
            job = executor.submit(self._job, name, arguments_json, deadline, span)
        except RuntimeError:  # the pool is shutting down
            grant.release()
            return self._shut_down(name, started)
        # From here the slot is released only when the job is done (run or cancelled): it
        # stays taken until the thread is free, even when the caller is gone.
        job.add_done_callback(lambda _: _call_soon(loop, grant.release))
        future = asyncio.wrap_future(job)
        try:
            done, _ = await asyncio.wait(
                {future}, timeout=max(0.0, deadline - time.monotonic()) + _DEADLINE_GRACE_S
            )
        except asyncio.CancelledError:
            if job.cancel():  # not started on its thread yet: it will never run
                self._observe(name, "cancelled", started, 0)
            raise
        if done:
            if future.cancelled():  # the pool was shut down before the job started
                return self._shut_down(name, started)
            # Prepare the next instance only now: a refill racing the hand-back of this
            # result for the GIL and the address space cost the caller ~1 ms.
            loop.call_soon(self._refill)
            return future.result()
        if job.cancel():
            self._observe(name, ToolErrorKind.DEADLINE, started, 0)
            message = f"tool {name!r} waited past its deadline to start"
        else:
            # Running but past its deadline: blocked in a host call, which the epoch check
            # cannot interrupt. The caller gets its answer now; the thread (and its slot)
            # is released when the host call returns (and the sandbox then traps on the
            # deadline).
            log.warning("tool %r is past its %.3g s deadline in a host call", name, budget)
            message = f"tool {name!r} did not finish within {budget:.2g} s"
        return CallOutcome(None, ToolError(ToolErrorKind.DEADLINE, message), 0)

    def _job(self, name: str, arguments_json: str, deadline: float, span: Any) -> CallOutcome:
        # Runs on a pool thread. ``span``: the call's (tracing on), told what the sandbox did.
        loaded = self._enter()
        if loaded is None:
            return CallOutcome(
                None, ToolError(ToolErrorKind.UNAVAILABLE, "the tool service is shut down"), 0
            )
        try:
            started = time.perf_counter()
            outcome = loaded.call(name, arguments_json, deadline)
        finally:
            loaded.leave()
        kind = "ok" if outcome.error is None else outcome.error.kind
        self._observe(name, kind, started, outcome.fuel_used)
        if span is not None:
            self.spans.tool_ran(span, time.perf_counter() - started, outcome.fuel_used)  # type: ignore[union-attr]
        return outcome

    def _enter(self) -> _Loaded | None:
        """The loaded runtime, counted as used until ``leave`` (None: none is loaded)."""
        while True:
            loaded = self._loaded
            if loaded.enter():
                if loaded.runtime is not None:
                    return loaded
                loaded.leave()
                return None
            # Replaced (and retired) between the read and the count: the next read sees
            # its successor.

    def _shut_down(self, name: str, started: float) -> CallOutcome:
        self._observe(name, ToolErrorKind.UNAVAILABLE, started, 0)
        return CallOutcome(
            None,
            ToolError(ToolErrorKind.UNAVAILABLE, "tools are unavailable: " + self._unavailable),
            0,
        )

    def _refill(self) -> None:
        executor = self._executor
        if executor is not None and self._loaded.runtime is not None:
            with contextlib.suppress(RuntimeError):  # shutting down
                executor.submit(self._refill_job)

    def _refill_job(self) -> None:
        loaded = self._enter()
        if loaded is not None:
            try:
                loaded.refill()
            finally:
                loaded.leave()

    def _observe(self, tool: str, outcome: str, started: float, fuel: int) -> None:
        if self._observer is not None:
            self._observer.tool_call_finished(tool, outcome, time.perf_counter() - started, fuel)


class _Loaded:
    """The tool specs a service serves and the runtime that runs them (None: none loaded).

    Replaced whole by :meth:`ToolService.install`; the replaced one is retired: it takes no
    new call, and its runtime is closed once the last call running on it has left (on that
    call's thread).
    """

    __slots__ = ("_lock", "_retired", "_running", "runtime", "specs")

    def __init__(self, specs: dict[str, ToolSpec], runtime: ToolRuntime | None) -> None:
        self.specs = specs
        self.runtime = runtime
        self._running = 0
        self._retired = False
        self._lock = threading.Lock()

    def enter(self) -> bool:
        """Count one more user; False once retired (the caller takes the new one)."""
        with self._lock:
            if self._retired:
                return False
            self._running += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self._running -= 1
            last = self._retired and self._running == 0
        if last:
            self.close()

    def retire(self) -> bool:
        """Take no new users; True when none is left (the caller closes it then)."""
        with self._lock:
            self._retired = True
            return self._running == 0

    def call(self, name: str, arguments_json: str, deadline: float) -> CallOutcome:
        assert self.runtime is not None
        return self.runtime.call(name, arguments_json, deadline=deadline)

    def refill(self) -> None:
        if self.runtime is not None:
            self.runtime.refill()

    def close(self) -> None:
        runtime, self.runtime = self.runtime, None
        if runtime is not None:
            runtime.close()


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody counts any more
        loop.call_soon_threadsafe(callback)
