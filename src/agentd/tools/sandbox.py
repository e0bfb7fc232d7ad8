"""The wasmtime adapter: calls into a compiled tool component, a fresh instance per call.

The only module that imports wasmtime. Each call runs in its own ``Store`` instantiated from
the precompiled component (the interpreter snapshot taken at build time), so nothing a call
does survives it. The store gets no preopened directories, no environment, no arguments,
no stdio and no network (WASI p2 defaults deny sockets and name lookups), a memory limit,
a fuel budget (CPU) and an epoch deadline (wall clock). Instances can be prepared ahead of
calls (``refill``); a prepared instance has never run a call, so it is as clean as a new
one.

Thread-safe: the engine, component and linker are shared; a store is used by one thread.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from pathlib import Path

from wasmtime import Config, Engine, Store, WasiConfig, WasmtimeError
from wasmtime.component import Component, Instance, Linker, Variant

from agentd.tools.errors import (
    ToolArgumentsInvalid,
    ToolCallFailed,
    ToolCrashed,
    ToolDeadlineExceeded,
    ToolError,
    ToolNotFound,
    ToolOutOfFuel,
    ToolOutOfMemory,
    ToolOutputTooLarge,
    ToolResultInvalid,
    ToolStackOverflow,
    ToolsUnavailable,
)
from agentd.tools.types import CallOutcome, LoadError, ToolLimits, ToolSpec

__all__ = ["WasmSandbox", "compile_component"]

log = logging.getLogger(__name__)

_TICK_S = 0.01  # epoch length: deadlines are kept to about this precision
_IDLE_TICKS = 100  # the ticker sleeps after this many epochs without a call
_SETUP_FUEL = 1 << 40  # instantiation's budget; a call gets its own limit after
_NO_DEADLINE = 1 << 40  # epochs: until a call sets its own deadline


def _engine() -> Engine:
    # Compile and load must use the same configuration, or deserialize refuses the artefact.
    config = Config()
    config.consume_fuel = True
    config.epoch_interruption = True
    return Engine(config)


def compile_component(wasm: bytes) -> bytes:
    """Compile a component to native code for this machine; the bytes ``WasmSandbox`` loads."""
    return bytes(Component(_engine(), wasm).serialize())


class _Instance:
    __slots__ = ("call", "store")

    def __init__(self, store: Store, call: object) -> None:
        self.store = store
        self.call = call


class WasmSandbox:
    """Runs tool calls in fresh instances of one precompiled component.

    Owns a ticker thread (runs while calls do) and up to ``pool_size`` prepared
    instances; ``close`` stops and frees them. Raises ToolsUnavailable when the artefact
    cannot be loaded.
    """

    def __init__(self, component_path: Path, limits: ToolLimits, *, pool_size: int = 0) -> None:
        self._limits = limits
        self._pool_size = pool_size
        self._engine = _engine()
        try:
            self._component = Component.deserialize_file(self._engine, str(component_path))
        except WasmtimeError as exc:
            raise ToolsUnavailable(
                f"cannot load the tool component {component_path}: {_cause(exc)}"
            ) from exc
        self._linker = Linker(self._engine)
        self._linker.add_wasip2()
        self._ready: deque[_Instance] = deque()
        self._refilling = threading.Lock()
        self._running = 0
        self._closed = False
        self._ticker_asleep = False
        self._wake = threading.Condition()
        self._ticker = threading.Thread(target=self._tick, name="agentd-tool-epoch", daemon=True)
        self._ticker.start()

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
                None, ToolDeadlineExceeded(f"tool {name!r}: deadline passed before it ran"), 0
            )
        try:
            instance = self._ready.popleft()
        except IndexError:
            try:
                instance = self._instantiate()
            except WasmtimeError as exc:
                return CallOutcome(
                    None, ToolCrashed(f"tool {name!r}: cannot start a sandbox: {_cause(exc)}"), 0
                )
        store = instance.store
        store.set_fuel(limits.max_fuel)
        store.set_epoch_deadline(max(1, math.ceil(budget / _TICK_S)))
        self._started()
        try:
            raw = instance.call(store, name, arguments_json, limits.max_output_bytes)  # type: ignore[operator]
        except WasmtimeError as exc:
            fuel_used = limits.max_fuel - _fuel_left(store)
            return CallOutcome(None, self._trap_error(name, exc, store, budget), fuel_used)
        except Exception as exc:  # converting values across the boundary failed
            log.exception("tool %r: unexpected error from the sandbox", name)
            error = ToolCrashed(f"tool {name!r} crashed: {type(exc).__name__}: {exc}")
            return CallOutcome(None, error, limits.max_fuel - _fuel_left(store))
        finally:
            self._finished()
        fuel_used = limits.max_fuel - _fuel_left(store)
        if isinstance(raw, Variant):
            return CallOutcome(None, self._guest_error(name, raw), fuel_used)
        if not isinstance(raw, str):
            return CallOutcome(None, ToolCrashed(f"tool {name!r}: malformed reply"), fuel_used)
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
        return specs, errors

    def close(self) -> None:
        self._closed = True
        with self._wake:
            self._wake.notify_all()
        self._ticker.join()
        self._ready.clear()

    # -- internals ---------------------------------------------------------------------

    def _new_instance(self) -> tuple[Store, Instance]:
        store = Store(self._engine)
        store.set_wasi(WasiConfig())  # nothing granted: no files, env, args, stdio, sockets
        store.set_limits(memory_size=self._limits.max_memory_bytes)
        store.set_fuel(_SETUP_FUEL)
        store.set_epoch_deadline(_NO_DEADLINE)
        return store, self._linker.instantiate(store, self._component)

    def _instantiate(self) -> _Instance:
        store, instance = self._new_instance()
        call = instance.get_func(store, "call")
        if call is None:
            raise WasmtimeError("the component exports no 'call' function")
        return _Instance(store, call)

    def _started(self) -> None:
        with self._wake:
            self._running += 1
            if self._ticker_asleep:
                self._wake.notify()

    def _finished(self) -> None:
        with self._wake:
            self._running -= 1

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
            self._engine.increment_epoch()

    def _too_large(self, name: str) -> ToolOutputTooLarge:
        return ToolOutputTooLarge(
            f"tool {name!r} returned more than the output limit of "
            f"{self._limits.max_output_bytes:,} bytes"
        )

    def _guest_error(self, name: str, reply: Variant) -> ToolCallFailed:
        detail = reply.payload
        match reply.tag:
            case "not-found":
                return ToolNotFound(f"no tool named {name!r}")
            case "invalid-arguments":
                return ToolArgumentsInvalid(f"tool {name!r}: {detail}")
            case "raised":
                return ToolError(f"tool {name!r} raised {detail}")
            case "bad-result":
                return ToolResultInvalid(
                    f"tool {name!r} returned a value that is not JSON: {detail}"
                )
            case "output-too-large":
                return self._too_large(name)
            case "out-of-memory":
                return self._out_of_memory(name)
            case "stack-overflow":
                return ToolStackOverflow(f"tool {name!r} recursed too deeply ({detail})")
        return ToolCrashed(f"tool {name!r}: unknown error {reply.tag!r}")

    def _out_of_memory(self, name: str) -> ToolOutOfMemory:
        return ToolOutOfMemory(
            f"tool {name!r} ran out of memory (limit {self._limits.max_memory_bytes:,} bytes)"
        )

    def _trap_error(
        self, name: str, exc: WasmtimeError, store: Store, budget: float
    ) -> ToolCallFailed:
        cause = _cause(exc)
        if _fuel_left(store) == 0 or "fuel" in cause:
            return ToolOutOfFuel(
                f"tool {name!r} ran out of fuel (CPU budget of {self._limits.max_fuel:,} units)"
            )
        if "interrupt" in cause:
            return ToolDeadlineExceeded(f"tool {name!r} did not finish within {budget:.2g} s")
        if "stack" in cause:
            return ToolStackOverflow(f"tool {name!r} exhausted its stack ({cause})")
        if "allocation" in cause:  # wasmtime's "allocation size too large"
            return self._out_of_memory(name)
        return ToolCrashed(f"tool {name!r} crashed: {cause}")


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
