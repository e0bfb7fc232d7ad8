"""Fair admission of tool calls: a queue per tool, served round-robin, within a memory budget.

The tool service asks :class:`FairScheduler` for a running slot before it hands a call to
its thread pool, and gives the slot back when the thread is free. A call starts at once when
a slot is free; otherwise it waits in its tool's queue. Each time a slot frees, it goes to
the first call of the tool that, among those with calls waiting and under their per-tool
cap, has the fewest calls running, and of those the one served least recently: round-robin
across tools, weighted towards an even share of threads. So one tool flooding the service
delays another tool's call by about one call's run time at most (and not at all while the
flooding tool is at its cap with threads to spare). Each running call reserves its memory
limit; a call that would take the total past the budget waits, in turn (later calls do not
pass it).

A waiting call ends with a ToolError of kind ``deadline`` at its deadline and never starts;
a cancelled caller's call leaves its queue; :meth:`FairScheduler.close` answers every waiting
call kind ``unavailable``. Plain asyncio: every method runs on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from agentd.tools.errors import ToolError, ToolErrorKind

__all__ = ["AdmissionLimits", "AdmissionStats", "FairScheduler", "Grant"]


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    """Bounds on tool calls. ``max_running`` is the thread count; the memory budget is in
    bytes and each call reserves what it asks for (the per-call memory limit)."""

    max_running: int
    max_running_per_tool: int
    max_queued: int
    max_queued_per_tool: int
    max_memory_bytes: int

    def __post_init__(self) -> None:
        for name in (
            "max_running",
            "max_running_per_tool",
            "max_queued",
            "max_queued_per_tool",
            "max_memory_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")


@dataclass(frozen=True, slots=True)
class AdmissionStats:
    """A snapshot for metrics. Per-tool maps hold every tool seen so far (zeros included)."""

    num_running: int
    num_queued: int
    memory_reserved_bytes: int
    running_per_tool: dict[str, int] = field(default_factory=dict)
    queued_per_tool: dict[str, int] = field(default_factory=dict)
    num_rejected: int = 0  # kind queue_full
    num_expired: int = 0  # deadline passed while waiting
    num_cancelled: int = 0  # caller gone while waiting


class Grant:
    """A running slot for one call of ``tool``. :meth:`release` it (on the event loop) once
    the call's thread is free; releasing twice is a no-op."""

    __slots__ = ("_released", "_scheduler", "memory_bytes", "tool", "waited_s")

    def __init__(
        self, scheduler: FairScheduler, tool: str, memory_bytes: int, waited_s: float
    ) -> None:
        self._scheduler = scheduler
        self._released = False
        self.tool = tool
        self.memory_bytes = memory_bytes
        self.waited_s = waited_s

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._scheduler._release(self)


class _Waiter:
    __slots__ = ("enqueued", "future", "memory_bytes", "seq", "timer", "tool")

    def __init__(
        self, tool: str, memory_bytes: int, future: asyncio.Future[Grant], seq: int
    ) -> None:
        self.tool = tool
        self.memory_bytes = memory_bytes
        self.future = future
        self.seq = seq  # arrival order: breaks ties between tools never served
        self.enqueued = time.monotonic()
        self.timer: asyncio.TimerHandle | None = None


class FairScheduler:
    """Admits tool calls fairly across tools within ``limits`` (see the module docstring).

    Owns no task and no thread: waiting callers hold their own futures, deadlines are loop
    timers. Raises ToolError of kind ``queue_full`` (queue bound), ``deadline`` (deadline
    while waiting) and ``unavailable`` (closed) from :meth:`admit`.
    """

    def __init__(self, limits: AdmissionLimits) -> None:
        self._limits = limits
        # tool -> its waiting calls in arrival order (O(1) removal from the middle); only
        # tools with calls waiting have an entry.
        self._queues: dict[str, OrderedDict[_Waiter, None]] = {}
        self._running: dict[str, int] = {}  # every tool seen, zeros included
        # tool -> when it last got a slot (a grant count): the least recent goes first.
        self._served: dict[str, int] = {}
        self._num_grants = 0
        self._num_arrivals = 0
        self._num_running = 0
        self._num_queued = 0
        self._reserved = 0
        self._rejected = self._expired = self._cancelled = 0
        self._closed: str | None = None

    @property
    def limits(self) -> AdmissionLimits:
        return self._limits

    @property
    def in_flight(self) -> int:
        """Calls running (until their thread is free) plus calls waiting."""
        return self._num_running + self._num_queued

    def statistics(self) -> AdmissionStats:
        tools = self._running.keys()
        return AdmissionStats(
            num_running=self._num_running,
            num_queued=self._num_queued,
            memory_reserved_bytes=self._reserved,
            running_per_tool=dict(self._running),
            queued_per_tool={t: len(self._queues.get(t, ())) for t in tools},
            num_rejected=self._rejected,
            num_expired=self._expired,
            num_cancelled=self._cancelled,
        )

    async def admit(self, tool: str, *, memory_bytes: int, timeout: float | None) -> Grant:
        """Wait for a running slot for one call of ``tool`` reserving ``memory_bytes``.

        ``timeout`` (seconds) bounds the wait: past it the call gets kind ``deadline`` and
        never starts. A call that can start now does, whatever its timeout. Cancelling the
        caller takes its call out of the queue (or gives back a slot granted meanwhile).
        """
        if self._closed is not None:
            raise ToolError(ToolErrorKind.UNAVAILABLE, f"tools are unavailable: {self._closed}")
        if memory_bytes > self._limits.max_memory_bytes:
            # Settings validation keeps this from happening: such a call could never start.
            raise ValueError(
                f"a call reserving {memory_bytes:,} bytes can never fit in the memory budget "
                f"of {self._limits.max_memory_bytes:,} bytes"
            )
        loop = asyncio.get_running_loop()
        self._num_arrivals += 1
        waiter = _Waiter(tool, memory_bytes, loop.create_future(), self._num_arrivals)
        if tool not in self._running:
            self._running[tool] = 0
            self._served[tool] = 0
        self._enqueue(waiter)
        self._dispatch()
        if waiter.future.done():  # started at once
            return waiter.future.result()
        queued = len(self._queues[tool])
        if self._num_queued > self._limits.max_queued:
            self._remove(waiter)
            self._rejected += 1
            raise ToolError(
                ToolErrorKind.QUEUE_FULL,
                f"too many tool calls in flight ({self.in_flight}); try again later",
            )
        if queued > self._limits.max_queued_per_tool:
            self._remove(waiter)
            self._rejected += 1
            raise ToolError(
                ToolErrorKind.QUEUE_FULL,
                f"too many calls of tool {tool!r} waiting ({queued - 1}); try again later",
            )
        if timeout is not None:
            if timeout <= 0:
                self._remove(waiter)
                self._expired += 1
                raise self._deadline_error(waiter)
            waiter.timer = loop.call_later(timeout, self._expire, waiter)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            self._abandon(waiter)
            raise

    def close(self, reason: str) -> None:
        """Refuse new calls and answer every waiting one a ToolError of kind
        ``unavailable`` (``reason``). Running calls keep their slots until released."""
        self._closed = reason
        queues, self._queues = self._queues, {}
        self._num_queued = 0
        for queue in queues.values():
            for waiter in queue:
                if waiter.timer is not None:
                    waiter.timer.cancel()
                if not waiter.future.done():
                    waiter.future.set_exception(
                        ToolError(ToolErrorKind.UNAVAILABLE, f"tools are unavailable: {reason}")
                    )

    # -- internals -----------------------------------------------------------------------

    def _enqueue(self, waiter: _Waiter) -> None:
        queue = self._queues.get(waiter.tool)
        if queue is None:
            queue = self._queues[waiter.tool] = OrderedDict()
        queue[waiter] = None
        self._num_queued += 1

    def _remove(self, waiter: _Waiter) -> bool:
        """Take a waiting call out of its queue; False if it is no longer waiting."""
        queue = self._queues.get(waiter.tool)
        if queue is None or queue.pop(waiter, False) is False:
            return False
        self._num_queued -= 1
        if not queue:
            del self._queues[waiter.tool]
        if waiter.timer is not None:
            waiter.timer.cancel()
        return True

    def _dispatch(self) -> None:
        # Grant slots while one is free, each to the head call of the tool next in turn.
        limits = self._limits
        while self._queues and self._num_running < limits.max_running:
            tool = self._next_in_turn()
            if tool is None:
                return  # every waiting tool is at its cap
            queue = self._queues[tool]
            waiter = next(iter(queue))
            if self._reserved + waiter.memory_bytes > limits.max_memory_bytes:
                return  # wait for memory in turn: later calls do not overtake this one
            self._remove(waiter)
            self._running[tool] += 1
            self._num_running += 1
            self._reserved += waiter.memory_bytes
            self._num_grants += 1
            self._served[tool] = self._num_grants
            grant = Grant(self, tool, waiter.memory_bytes, time.monotonic() - waiter.enqueued)
            waiter.future.set_result(grant)

    def _next_in_turn(self) -> str | None:
        """Of the tools with calls waiting and under their cap: the one with the fewest
        calls running, then the one served least recently, then the earliest caller."""
        cap = self._limits.max_running_per_tool
        best: tuple[int, int, int] | None = None
        chosen = None
        for tool, queue in self._queues.items():
            running = self._running[tool]
            if running >= cap:
                continue
            key = (running, self._served[tool], next(iter(queue)).seq)
            if best is None or key < best:
                best, chosen = key, tool
        return chosen

    def _release(self, grant: Grant) -> None:
        self._running[grant.tool] -= 1
        self._num_running -= 1
        self._reserved -= grant.memory_bytes
        self._dispatch()

    def _expire(self, waiter: _Waiter) -> None:
        if self._remove(waiter):
            self._expired += 1
            waiter.future.set_exception(self._deadline_error(waiter))
            self._dispatch()  # it may have held the head of the round for memory

    def _abandon(self, waiter: _Waiter) -> None:
        if self._remove(waiter):
            self._cancelled += 1
            self._dispatch()
            return
        future = waiter.future
        # Granted just before the cancellation landed: give the slot back. (Asking for the
        # exception also marks an error as retrieved, so asyncio does not log it as lost.)
        if future.done() and not future.cancelled() and future.exception() is None:
            future.result().release()

    @staticmethod
    def _deadline_error(waiter: _Waiter) -> ToolError:
        waited = time.monotonic() - waiter.enqueued
        return ToolError(
            ToolErrorKind.DEADLINE,
            f"tool {waiter.tool!r} waited past its deadline to start ({waited:.2g} s in the queue)",
        )
