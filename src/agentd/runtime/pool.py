"""A fixed pool of worker tasks running jobs from one bounded queue.

Jobs are objects with an ``async run()``; an idle agent is not a job and costs no task. A
full queue pushes back: ``submit`` waits for room, ``submit_nowait`` raises
ResourceExhausted. Nothing accepted is dropped: ``aclose`` lets queued jobs finish.

Expired work does not hold a place: a job whose callers all gave up while it waited (their
deadlines passed) is told so with ``mark_stale()``, and a full queue first drops the jobs
that say, through ``drop_if_expired()``, that nothing live is left in them.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from agentd.errors import ResourceExhausted, Unavailable

__all__ = ["ExpiringJob", "Job", "PoolStats", "WorkerPool"]

log = logging.getLogger(__name__)


class Job(Protocol):
    async def run(self) -> None: ...


class ExpiringJob(Job, Protocol):
    """A job whose work can expire while it waits (an agent whose calls' deadlines pass)."""

    def drop_if_expired(self) -> bool:
        """True when nothing live is left in the job (it then forgets it was queued and
        the pool drops it); False to keep its place."""
        ...


@dataclass(frozen=True, slots=True)
class PoolStats:
    num_workers: int
    max_queued: int
    queued: int
    busy: int
    completed: int
    rejected: int
    dropped: int  # queued jobs dropped because their work expired while they waited


class WorkerPool:
    """``num_workers`` tasks share a queue of at most ``max_queued`` jobs."""

    def __init__(self, num_workers: int, max_queued: int) -> None:
        if num_workers < 1 or max_queued < 1:
            raise ValueError("a pool needs at least one worker and room for one job")
        self._num_workers = num_workers
        self._max_queued = max_queued
        self._low_water = max_queued // 2
        self._queue: deque[Job] = deque()
        self._idle: deque[asyncio.Future[None]] = deque()  # workers waiting for a job
        self._room: deque[asyncio.Future[None]] = deque()  # submitters waiting for room
        self._workers: list[asyncio.Task[None]] = []
        self._running: list[Job | None] = []  # the job each worker runs now, by worker
        self._closing = False
        self._busy = 0
        self._completed = 0
        self._rejected = 0
        self._stale = 0  # expiries reported since the queue was last pruned
        self._dropped = 0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if not self._workers:
            self._running = [None] * self._num_workers
            self._workers = [
                loop.create_task(self._work(i), name=f"worker-{i}")
                for i in range(self._num_workers)
            ]

    def statistics(self) -> PoolStats:
        return PoolStats(
            self._num_workers,
            self._max_queued,
            len(self._queue),
            self._busy,
            self._completed,
            self._rejected,
            self._dropped,
        )

    def submit_nowait(self, job: Job) -> bool:
        """Queue ``job`` or raise ResourceExhausted at once. True when an idle worker was
        woken for it (it starts in the next loop iteration), False when it waits."""
        if self._closing:
            raise Unavailable("the worker pool is shutting down")
        if len(self._queue) >= self._max_queued and not self._prune():
            self._rejected += 1
            raise ResourceExhausted(f"the run queue is full ({self._max_queued} jobs)")
        return self._push(job)

    def full(self) -> bool:
        return len(self._queue) >= self._max_queued and not self._prune()

    def room(self) -> int:
        """Places left on the queue; raises Unavailable when the pool is shutting down."""
        if self._closing:
            raise Unavailable("the worker pool is shutting down")
        if len(self._queue) >= self._max_queued:
            self._prune()
        return max(0, self._max_queued - len(self._queue))

    def running(self) -> list[tuple[asyncio.Task[None], Job]]:
        """The jobs running now, each with the worker task that runs it (for a watchdog
        that stops work past its deadline)."""
        pairs = zip(self._workers, self._running, strict=False)
        return [(task, job) for task, job in pairs if job is not None]

    def mark_stale(self) -> None:
        """Work in a queued job expired: a full queue looks for jobs to drop first."""
        self._stale += 1

    def _prune(self) -> bool:
        """Drop the queued jobs whose work all expired; True when that made room.

        Called only when the queue is full and expiries were reported since the last
        prune, and only when they are a sixteenth of the queue or more: a scan costs one
        check per queued job, so each reported expiry pays for at most sixteen.
        """
        queue = self._queue
        if not self._stale or self._stale * 16 < len(queue):
            return False
        self._stale = 0
        kept: deque[Job] = deque()
        for job in queue:
            drop = getattr(job, "drop_if_expired", None)
            if drop is None or not drop():
                kept.append(job)
        dropped = len(queue) - len(kept)
        if not dropped:
            return False
        queue.clear()  # in place: the workers hold this deque
        queue.extend(kept)
        self._dropped += dropped
        if self._room:
            self._wake_submitters()
        return len(kept) < self._max_queued

    def submit_many_nowait(self, jobs: Sequence[Job]) -> None:
        """Queue ``jobs`` in order, all or none: ResourceExhausted (nothing queued) when
        they do not fit (see ``room``), Unavailable when closing."""
        if len(jobs) > self.room():
            self._rejected += len(jobs)
            raise ResourceExhausted(f"the run queue has no room for {len(jobs)} jobs")
        self._queue.extend(jobs)
        woken = 0
        idle = self._idle
        while idle and woken < len(jobs):
            waiter = idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                woken += 1

    async def wait_for_room(self) -> None:
        """Return once the queue has drained below its bound (or the pool is closing)."""
        while self.full() and not self._closing:
            room = asyncio.get_running_loop().create_future()
            self._room.append(room)
            try:
                await room
            except asyncio.CancelledError:
                if room.done() and not room.cancelled():
                    self._wake_submitter()  # pass the room on to the next one
                raise

    async def submit(self, job: Job) -> None:
        """Queue ``job``, waiting while the queue is full."""
        await self.wait_for_room()
        if self._closing:
            raise Unavailable("the worker pool is shutting down")
        self._push(job)

    def requeue(self, job: Job) -> None:
        """Queue work that was already accepted (an agent with more messages waiting):
        past the bound, since nothing accepted may be dropped."""
        self._push(job)

    def _push(self, job: Job) -> bool:
        self._queue.append(job)
        while self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():
                # Workers wait only while the queue is empty, and each push wakes its own:
                # a job that woke one is taken in the next loop iteration.
                waiter.set_result(None)
                return True
        return False

    def _wake_submitter(self) -> None:
        while self._room:
            room = self._room.popleft()
            if not room.done():
                room.set_result(None)
                return

    def _wake_submitters(self) -> None:
        rooms, self._room = self._room, deque()
        for room in rooms:
            if not room.done():
                room.set_result(None)

    async def _work(self, slot: int) -> None:
        queue = self._queue
        running = self._running
        loop = asyncio.get_running_loop()
        while True:
            if not queue:
                if self._closing:
                    return
                waiter = loop.create_future()
                self._idle.append(waiter)
                await waiter
                continue
            job = queue.popleft()
            if self._room and len(queue) <= self._low_water:
                # Hysteresis: waiting submitters resume once the queue is half empty and
                # refill it in one go, instead of one wake-up per finished job.
                self._wake_submitters()
            self._busy += 1
            running[slot] = job
            try:
                await job.run()
            except Exception:  # a job's own errors are its to report; keep the worker alive
                log.exception("job %r failed", job)
            finally:
                running[slot] = None
                self._busy -= 1
                self._completed += 1

    async def aclose(self, timeout: float | None = None) -> None:
        """Finish queued jobs, then stop the workers; cancel what runs past ``timeout``."""
        self._closing = True
        for waiter in self._idle:
            if not waiter.done():
                waiter.set_result(None)
        self._idle.clear()
        for room in self._room:
            if not room.done():
                room.set_result(None)
        if self._workers:
            _done, pending = await asyncio.wait(self._workers, timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        self._workers = []
