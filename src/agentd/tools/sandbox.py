"""The wasmtime adapter: calls into compiled tool components, a fresh instance per call.

The only module that imports wasmtime. Each call runs in its own ``Store`` instantiated from
a precompiled component (the interpreter snapshot taken at build time), so nothing a call
does survives it. The store gets no preopened directories, no environment, no arguments,
no stdio and no network (WASI p2 defaults deny sockets and name lookups), a memory limit,
a fuel budget (CPU) and an epoch deadline (wall clock). Instances can be prepared ahead of
calls (``refill``); a prepared instance has never run a call, so it is as clean as a new
one.

The wall-clock deadline interrupts WebAssembly code, not a host call in progress, so the
instance gets no host call that can wait: WASI's monotonic clock is replaced by one whose
``subscribe-duration`` / ``subscribe-instant`` trap at once. Those are the only pollables
that can take time to become ready here (stdin is closed, stdout and stderr are sinks,
sockets cannot connect, bind or look up names), so ``wasi:io/poll`` ``poll`` and
``pollable.block`` always return at once; they cannot be replaced themselves because their
``pollable`` resource type belongs to wasmtime's WASI and a Python host cannot name it.

Every component of a node shares one :class:`SandboxEngine`: one wasmtime engine with a
pooling allocator (instances reuse pre-reserved memory slots mapped copy-on-write from the
snapshot, instead of an ``mmap``/``munmap`` per call) and one epoch ticker thread.

Thread-safe: the engine, components and linkers are shared; a store is used by one thread.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import threading
import time
from collections import deque
from pathlib import Path

from wasmtime import Config, Engine, Store, WasiConfig, WasmtimeError
from wasmtime import _ffi as ffi  # the C API, for what wasmtime-py does not wrap (pinned <51)
from wasmtime.component import Component, Func, Instance, Linker, LinkerInstance, Variant

from agentd.tools.errors import ToolError, ToolErrorKind
from agentd.tools.types import CallOutcome, LoadError, ToolLimits, ToolSpec

__all__ = ["MAX_CLOCK_READS", "SandboxEngine", "WasmSandbox", "compile_component"]

log = logging.getLogger(__name__)

_TICK_S = 0.01  # epoch length: deadlines are kept to about this precision
_IDLE_TICKS = 100  # the ticker sleeps after this many epochs without a call
_SETUP_FUEL = 1 << 40  # instantiation's budget; a call gets its own limit after
_NO_DEADLINE = 1 << 40  # epochs: until a call sets its own deadline

# What one componentize-py component needs from the pooling allocator (measured: 14 core
# instances, 1 memory, 2 tables of at most 5,670 elements), with room to spare.
_CORE_INSTANCES_PER_COMPONENT = 32
_MEMORIES_PER_COMPONENT = 1
_TABLES_PER_COMPONENT = 4
_TABLE_ELEMENTS = 1 << 16
_WASM_PAGE = 1 << 16
# Address space a pooled memory slot reserves: a wasm32 memory's 4 GiB (so that bounds
# checks are free) plus guard regions (measured: 4 GiB + 36 MiB).
_SLOT_RESERVATION = (4 << 30) + (64 << 20)

_MONOTONIC_CLOCK = "wasi:clocks/monotonic-clock@"
WAIT_REFUSED = "waiting is not allowed in the tool sandbox"
# Each read of the monotonic clock is a call into this Python process (under its GIL); a
# tool may time itself, but not spin on the clock (a busy wait) at the host's expense.
MAX_CLOCK_READS = 1000
_CLOCK_REFUSED = "too many monotonic clock reads"


def _config(*, max_instances: int = 0, max_memory_bytes: int = 0) -> Config:
    """The engine configuration. Fuel and epochs change the compiled code, so compile and
    load must agree on them (deserialize refuses the artefact otherwise); the allocation
    strategy does not, so an engine with a pool loads what one without compiled."""
    config = Config()
    config.consume_fuel = True
    config.epoch_interruption = True
    config.memory_init_cow = True  # the default, relied on: map the snapshot, never copy it
    if max_instances > 0:
        pool = ffi.wasmtime_pooling_allocation_config_new()
        try:
            for option, value in _pool_options(max_instances, max_memory_bytes).items():
                getattr(ffi, f"wasmtime_pooling_allocation_config_{option}_set")(pool, value)
            ffi.wasmtime_pooling_allocation_strategy_set(config.ptr(), pool)
        finally:
            ffi.wasmtime_pooling_allocation_config_delete(pool)
    return config


def _pool_options(max_instances: int, max_memory_bytes: int) -> dict[str, int]:
    memory = -(-max(max_memory_bytes, _WASM_PAGE) // _WASM_PAGE) * _WASM_PAGE
    return {
        "total_component_instances": max_instances,
        "total_core_instances": max_instances * _CORE_INSTANCES_PER_COMPONENT,
        "max_core_instances_per_component": _CORE_INSTANCES_PER_COMPONENT,
        "total_memories": max_instances * _MEMORIES_PER_COMPONENT,
        "max_memories_per_component": _MEMORIES_PER_COMPONENT,
        "total_tables": max_instances * _TABLES_PER_COMPONENT,
        "max_tables_per_component": _TABLES_PER_COMPONENT,
        "table_elements": _TABLE_ELEMENTS,
        "max_memory_size": memory,
        "total_stacks": 0,  # only async calls use pooled stacks
        # A freed slot gives its pages back at once (madvise): real memory stays bounded by
        # the instances alive, each within its store limit.
        "linear_memory_keep_resident": 0,
        "table_keep_resident": 0,
    }


def default_call_slots() -> int:
    """Instances a sandbox that owns its engine allows at once besides prepared ones. It
    cannot know how many threads call it, so it allows far more than the default number of
    tool threads (the slots cost address space, not memory); a node sizes its shared engine
    from its settings instead (:meth:`SandboxEngine.for_node`)."""
    return max(64, 4 * (os.cpu_count() or 1) + 2)


class SandboxEngine:
    """One wasmtime engine for every component of a node.

    ``max_instances`` is how many instances may exist at once across all components using
    it (calls in flight plus prepared ones; see :meth:`for_node`). Its pooling allocator
    reserves that many slots up front: about 4 GiB of address space each (wasm32 memories
    are reserved whole so that bounds checks are free; address space, not memory), and
    real memory only for instances alive, each at most ``max_memory_bytes``. More
    instances than that fail to start. ``max_instances=0`` allocates on demand (no pool).
    Owns the epoch ticker thread; ``close`` stops it.
    """

    def __init__(self, *, max_instances: int = 0, max_memory_bytes: int = 128 << 20) -> None:
        if max_instances > 0 and not _room_for_pool(max_instances):
            max_instances = 0
        self.max_instances = max_instances
        self.max_memory_bytes = max_memory_bytes
        self.engine = Engine(
            _config(max_instances=max_instances, max_memory_bytes=max_memory_bytes)
        )
        self._running = 0
        self._closed = False
        self._ticker_asleep = False
        self._wake = threading.Condition()
        self._ticker = threading.Thread(target=self._tick, name="agentd-tool-epoch", daemon=True)
        self._ticker.start()

    @classmethod
    def for_node(
        cls, limits: ToolLimits, *, threads: int, pool_size: int, components: int
    ) -> SandboxEngine:
        """An engine sized from the settings: a slot per tool thread, ``pool_size`` prepared
        instances per component, and two for ``inspect`` and callers outside the pool."""
        return cls(
            max_instances=threads + pool_size * components + 2,
            max_memory_bytes=limits.max_memory_bytes,
        )

    def started(self) -> None:
        with self._wake:
            self._running += 1
            if self._ticker_asleep:
                self._wake.notify()

    def finished(self) -> None:
        with self._wake:
            self._running -= 1

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        if self._ticker is not threading.current_thread():
            self._ticker.join()

    def _tick(self) -> None:
        # Epochs advance while calls run and for a second after the last one; an idle
        # server does not wake up, and a busy one does not wake the ticker for each call.
        idle_ticks = 0
        while True:
            with self._wake:
                if self._running:
                    idle_ticks = 0
                else:
                    idle_ticks += 1
                while idle_ticks > _IDLE_TICKS and not self._running and not self._closed:
                    self._ticker_asleep = True
                    self._wake.wait()
                    self._ticker_asleep = False
                if self._closed:
                    return
            time.sleep(_TICK_S)
            self.engine.increment_epoch()


def _room_for_pool(max_instances: int) -> bool:
    """Whether the process may reserve the pool's address space. wasmtime aborts the whole
    process (a panic in its C API) when the reservation fails, so a limit on the address
    space (``ulimit -v``) is checked first; without room the engine allocates on demand."""
    import resource

    limit, _ = resource.getrlimit(resource.RLIMIT_AS)
    needed = max_instances * _MEMORIES_PER_COMPONENT * _SLOT_RESERVATION
    # Half the limit at most: the rest is for the process itself and on-demand instances.
    if limit == resource.RLIM_INFINITY or needed <= limit // 2:
        return True
    log.warning(
        "the tool sandbox pool (%d instances) needs %.0f GiB of address space and the "
        "process is limited to %.0f GiB (ulimit -v): instances are allocated on demand",
        max_instances,
        needed / (1 << 30),
        limit / (1 << 30),
    )
    return False


def compile_component(wasm: bytes) -> bytes:
    """Compile a component to native code for this machine; the bytes ``WasmSandbox`` loads
    (with any :class:`SandboxEngine`: the pool does not change the compiled code)."""
    return bytes(Component(Engine(_config()), wasm).serialize())


class _Instance:
    __slots__ = ("call", "store")

    def __init__(self, store: Store, call: Func) -> None:
        self.store = store
        self.call = call


# Per thread: how many monotonic clock reads the call running on it may still make. A call
# runs on one thread from start to end, and so do the host functions it calls.
_calls = threading.local()

# The clock's host functions are C callbacks on the C API, not wasmtime-py's ``add_func``:
# a Python exception raised in one of those stays in a reference cycle with the frames of
# the call, and so does the call's store (its pool slot) until the garbage collector runs.
# These report a trap by returning a wasmtime error instead, and skip building the
# function's type on each read.
_HostFunc = ffi.wasmtime_component_func_callback_t
_U64_KIND = ffi.WASMTIME_COMPONENT_U64.value


def _trap(message: str) -> int:
    # The returned error is taken over by wasmtime: the call traps with this message.
    error = ffi.wasmtime_error_new(message.encode())
    return ctypes.cast(error, ctypes.c_void_p).value or 0


@_HostFunc
def _clock_now(_env, _context, _ty, _args, _nargs, results, _nresults):
    left = getattr(_calls, "clock_reads_left", 0)
    if left <= 0:
        return _trap(_CLOCK_REFUSED)
    _calls.clock_reads_left = left - 1
    results[0].kind = _U64_KIND
    results[0].of.u64 = time.monotonic_ns()
    return 0


@_HostFunc
def _clock_resolution(_env, _context, _ty, _args, _nargs, results, _nresults):
    results[0].kind = _U64_KIND
    results[0].of.u64 = 1
    return 0


@_HostFunc
def _no_waiting(_env, _context, _ty, _args, _nargs, _results, _nresults):
    # A trap ends the call at once; the guest cannot catch it.
    return _trap(WAIT_REFUSED)


@ctypes.CFUNCTYPE(None, ctypes.c_void_p)
def _no_finalizer(_env):
    return None


_CLOCK_FUNCS = {
    "now": _clock_now,
    "resolution": _clock_resolution,
    "subscribe-duration": _no_waiting,
    "subscribe-instant": _no_waiting,
}


def _define_clock(instance: LinkerInstance) -> None:
    for name, callback in _CLOCK_FUNCS.items():
        raw = name.encode()
        error = ffi.wasmtime_component_linker_instance_add_func(
            instance.ptr(),
            ctypes.create_string_buffer(raw),
            len(raw),
            callback,
            None,
            _no_finalizer,
        )
        if error:
            raise WasmtimeError._from_ptr(error)


class WasmSandbox:
    """Runs tool calls in fresh instances of one precompiled component.

    Uses ``engine`` (shared by the node's components) or, without one, an engine of its
    own sized for ``pool_size`` prepared instances and :func:`default_call_slots` calls,
    which ``close`` then stops. Keeps up to ``pool_size`` prepared instances; ``close``
    frees them. Raises ToolError (``unavailable``) when the artefact cannot be loaded.
    """

    def __init__(
        self,
        component_path: Path,
        limits: ToolLimits,
        *,
        pool_size: int = 0,
        engine: SandboxEngine | None = None,
    ) -> None:
        self._limits = limits
        self._pool_size = pool_size
        self._own_engine = engine is None
        if engine is None:
            engine = SandboxEngine(
                max_instances=pool_size + default_call_slots(),
                max_memory_bytes=limits.max_memory_bytes,
            )
        self._shared = engine
        self._engine = engine.engine
        try:
            self._component = Component.deserialize_file(self._engine, str(component_path))
            self._linker = self._make_linker()
        except WasmtimeError as exc:
            if self._own_engine:
                engine.close()
            raise ToolError(
                ToolErrorKind.UNAVAILABLE,
                f"cannot load the tool component {component_path}: {_cause(exc)}",
            ) from exc
        self._ready: deque[_Instance] = deque()
        self._refilling = threading.Lock()
        self._closed = False

    # -- calls -------------------------------------------------------------------------

    def call(self, name: str, arguments_json: str, *, deadline: float | None = None) -> CallOutcome:
        """Run tool ``name`` once. ``deadline`` (``time.monotonic``) shortens the configured
        timeout when it comes first. Every failure is returned in the outcome, never raised."""
        limits = self._limits
        budget = limits.timeout_s
        if deadline is not None:
            budget = min(budget, deadline - time.monotonic())
        if budget <= 0:
            return CallOutcome(
                None,
                ToolError(ToolErrorKind.DEADLINE, f"tool {name!r}: deadline passed before it ran"),
                0,
            )
        try:
            instance = self._ready.popleft()
        except IndexError:
            try:
                instance = self._instantiate()
            except WasmtimeError as exc:
                return CallOutcome(None, self._start_error(name, exc), 0)
        store = instance.store
        store.set_fuel(limits.max_fuel)
        store.set_epoch_deadline(max(1, math.ceil(budget / _TICK_S)))
        self._shared.started()
        _calls.clock_reads_left = MAX_CLOCK_READS
        try:
            raw = _call_tool(instance.call, store, name, arguments_json, limits.max_output_bytes)
        except WasmtimeError as exc:
            fuel_used = limits.max_fuel - _fuel_left(store)
            return CallOutcome(None, self._trap_error(name, exc, store, budget), fuel_used)
        except Exception as exc:  # converting values across the boundary failed
            log.exception("tool %r: unexpected error from the sandbox", name)
            error = ToolError(
                ToolErrorKind.CRASHED, f"tool {name!r} crashed: {type(exc).__name__}: {exc}"
            )
            return CallOutcome(None, error, limits.max_fuel - _fuel_left(store))
        finally:
            _calls.clock_reads_left = 0
            self._shared.finished()
        fuel_used = limits.max_fuel - _fuel_left(store)
        if isinstance(raw, Variant):
            return CallOutcome(None, self._guest_error(name, raw), fuel_used)
        # The guest checked the size already; a tool that tampered with the guest is caught here.
        if len(raw) > limits.max_output_bytes or len(raw.encode()) > limits.max_output_bytes:
            return CallOutcome(None, self._too_large(name), fuel_used)
        return CallOutcome(raw, None, fuel_used)

    def refill(self) -> None:
        """Prepare instances until ``pool_size`` wait (one refiller at a time; others return)."""
        if not self._refilling.acquire(blocking=False):
            return
        try:
            while len(self._ready) < self._pool_size and not self._closed:
                self._ready.append(self._instantiate())
        except WasmtimeError:
            pass  # calls instantiate for themselves and report the failure
        finally:
            self._refilling.release()

    def inspect(self) -> tuple[list[ToolSpec], list[LoadError]]:
        """The tools the component exports and the tool files that failed to load."""
        _calls.clock_reads_left = MAX_CLOCK_READS
        try:
            store, exports = self._new_instance()
            specs = [
                ToolSpec(s.name, s.description, json.loads(getattr(s, "parameters-json")))
                for s in exports.get_func(store, "list-tools")(store)  # type: ignore[misc]
            ]
            store, exports = self._new_instance()  # one export call per instance
            errors = [
                LoadError(e.file, e.message)
                for e in exports.get_func(store, "load-errors")(store)  # type: ignore[misc]
            ]
        finally:
            _calls.clock_reads_left = 0
        return specs, errors

    def close(self) -> None:
        self._closed = True
        self._ready.clear()
        if self._own_engine:
            self._shared.close()

    # -- internals ---------------------------------------------------------------------

    def _make_linker(self) -> Linker:
        linker = Linker(self._engine)
        linker.add_wasip2()
        # Replace the monotonic clock under each name the component imports it by (an exact
        # name wins over wasmtime's semver-compatible one). Functions the component imports
        # from it and that are not defined here fail the load: closed, not open.
        clocks = [
            name
            for name in self._component.type.imports(self._engine)
            if name.startswith(_MONOTONIC_CLOCK)
        ]
        linker.allow_shadowing = True
        with linker.root() as root:
            for name in clocks:
                with root.add_instance(name) as clock:
                    _define_clock(clock)
        linker.allow_shadowing = False
        return linker

    def _new_instance(self) -> tuple[Store, Instance]:
        store = Store(self._engine)
        store.set_wasi(WasiConfig())  # nothing granted: no files, env, args, stdio, sockets
        store.set_limits(memory_size=self._limits.max_memory_bytes)
        store.set_fuel(_SETUP_FUEL)
        store.set_epoch_deadline(_NO_DEADLINE)
        # The component's start code runs here, on whichever thread prepares the instance;
        # it gets a clock budget of its own (it reads none today).
        reads_left = getattr(_calls, "clock_reads_left", 0)
        _calls.clock_reads_left = MAX_CLOCK_READS
        try:
            return store, self._linker.instantiate(store, self._component)
        finally:
            _calls.clock_reads_left = reads_left

    def _instantiate(self) -> _Instance:
        store, instance = self._new_instance()
        call = instance.get_func(store, "call")
        if call is None:
            raise WasmtimeError("the component exports no 'call' function")
        return _Instance(store, call)

    def _start_error(self, name: str, exc: WasmtimeError) -> ToolError:
        cause = _cause(exc)
        if "concurrent" in cause and "limit" in cause:  # the pool's slots are all in use
            cause = (
                f"all {self._shared.max_instances} sandbox slots are in use "
                "(more calls at once than the engine was sized for)"
            )
        return ToolError(ToolErrorKind.CRASHED, f"tool {name!r}: cannot start a sandbox: {cause}")

    def _too_large(self, name: str) -> ToolError:
        return ToolError(
            ToolErrorKind.OUTPUT_TOO_LARGE,
            f"tool {name!r} returned more than the output limit of "
            f"{self._limits.max_output_bytes:,} bytes",
        )

    def _guest_error(self, name: str, reply: Variant) -> ToolError:
        detail = reply.payload
        match reply.tag:
            case "not-found":
                return ToolError(ToolErrorKind.NOT_FOUND, f"no tool named {name!r}")
            case "invalid-arguments":
                return ToolError(ToolErrorKind.INVALID_ARGUMENTS, f"tool {name!r}: {detail}")
            case "raised":
                return ToolError(ToolErrorKind.RAISED, f"tool {name!r} raised {detail}")
            case "bad-result":
                return ToolError(
                    ToolErrorKind.BAD_RESULT,
                    f"tool {name!r} returned a value that is not JSON: {detail}",
                )
            case "output-too-large":
                return self._too_large(name)
            case "out-of-memory":
                return self._out_of_memory(name)
            case "stack-overflow":
                return ToolError(
                    ToolErrorKind.STACK_OVERFLOW, f"tool {name!r} recursed too deeply ({detail})"
                )
        return ToolError(ToolErrorKind.CRASHED, f"tool {name!r}: unknown error {reply.tag!r}")

    def _out_of_memory(self, name: str) -> ToolError:
        return ToolError(
            ToolErrorKind.OUT_OF_MEMORY,
            f"tool {name!r} ran out of memory (limit {self._limits.max_memory_bytes:,} bytes)",
        )

    def _trap_error(self, name: str, exc: WasmtimeError, store: Store, budget: float) -> ToolError:
        cause = _cause(exc)
        if cause == WAIT_REFUSED:
            return ToolError(
                ToolErrorKind.RAISED,
                f"tool {name!r} was stopped: {WAIT_REFUSED} (it asked the host to wait: "
                "sleep, select, poll or a timeout)",
            )
        if cause == _CLOCK_REFUSED:
            return ToolError(
                ToolErrorKind.RAISED,
                f"tool {name!r} was stopped: it read the monotonic clock more than "
                f"{MAX_CLOCK_READS:,} times in one call (busy waiting is not allowed in the "
                "tool sandbox)",
            )
        if _fuel_left(store) == 0 or "fuel" in cause:
            return ToolError(
                ToolErrorKind.OUT_OF_FUEL,
                f"tool {name!r} ran out of fuel (CPU budget of {self._limits.max_fuel:,} units)",
            )
        if "interrupt" in cause:
            return ToolError(
                ToolErrorKind.DEADLINE, f"tool {name!r} did not finish within {budget:.2g} s"
            )
        if "stack" in cause:
            return ToolError(
                ToolErrorKind.STACK_OVERFLOW, f"tool {name!r} exhausted its stack ({cause})"
            )
        if "allocation" in cause:  # wasmtime's "allocation size too large"
            return self._out_of_memory(name)
        return ToolError(ToolErrorKind.CRASHED, f"tool {name!r} crashed: {cause}")


# -- the call across the boundary ------------------------------------------------------
#
# wasmtime-py's Func.__call__ rebuilds the function's type (a dozen C calls and Python
# objects for the params, the result and the 7-case error variant) on every call, under
# the GIL. The tools world's ``call`` has one fixed signature, so it is lowered and lifted
# here directly: (string, string, u64) -> result<string, call-error>.

_Val = ffi.wasmtime_component_val_t
_STRING = ffi.WASMTIME_COMPONENT_STRING.value
_U64 = ffi.WASMTIME_COMPONENT_U64.value
_RESULT = ffi.WASMTIME_COMPONENT_RESULT.value
_VARIANT = ffi.WASMTIME_COMPONENT_VARIANT.value


def _call_tool(
    func: Func, store: Store, name: str, arguments_json: str, max_output: int
) -> str | Variant:
    params = (_Val * 3)()
    params[0].kind = _STRING
    params[0].of.string = ffi.str_to_capi(name)
    params[1].kind = _STRING
    params[1].of.string = ffi.str_to_capi(arguments_json)
    params[2].kind = _U64
    params[2].of.u64 = max_output
    result = _Val()
    try:
        error = ffi.wasmtime_component_func_call(
            ctypes.byref(func._func), store._context(), params, 3, ctypes.byref(result), 1
        )
    finally:
        ffi.wasmtime_component_val_delete(ctypes.byref(params[0]))
        ffi.wasmtime_component_val_delete(ctypes.byref(params[1]))
    if error:
        raise WasmtimeError._from_ptr(error)
    try:
        return _lift_reply(result)
    finally:
        ffi.wasmtime_component_val_delete(ctypes.byref(result))


def _lift_reply(result: ffi.wasmtime_component_val_t) -> str | Variant:
    if result.kind != _RESULT or not result.of.result.val:
        raise TypeError("the component's reply is not a result with a value")
    value = result.of.result.val.contents
    if result.of.result.is_ok:
        if value.kind != _STRING:
            raise TypeError("the component's result is not a string")
        return ffi.to_str(value.of.string)
    if value.kind != _VARIANT:
        raise TypeError("the component's error is not a variant")
    tag = ffi.to_str(value.of.variant.discriminant)
    payload: object = None
    if value.of.variant.val:
        case = value.of.variant.val.contents
        if case.kind == _STRING:
            payload = ffi.to_str(case.of.string)
        elif case.kind == _U64:
            payload = case.of.u64
    return Variant(tag, payload)


def _fuel_left(store: Store) -> int:
    try:
        return store.get_fuel()
    except WasmtimeError:
        return 0


def _cause(exc: WasmtimeError) -> str:
    """The root cause line of a wasmtime error (its message starts with a backtrace)."""
    text = str(exc)
    if "Caused by:" in text:
        text = text.rsplit("Caused by:", 1)[1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else "unknown error"
