"""Dynamic batching: calls for one model that arrive close together run as one batch.

Plain asyncio and numpy. The batcher owns one worker task; callers ``await submit()``. A
caller cancelled before its batch runs loses its row (it is never run); a full queue rejects
at once with ResourceExhausted rather than growing. Closing answers every caller it holds:
the batch running finishes and resolves its callers, queued calls run too (``drain``, a
reload) or fail with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np

from agentd.errors import InvalidArgument, ResourceExhausted, Unavailable
from agentd.inference.types import BatchingConfig

if TYPE_CHECKING:
    from agentd.observability.spans import Spans

__all__ = ["BatchObserver", "BatcherStats", "DynamicBatcher"]

Arrays = dict[str, np.ndarray]
RunFn = Callable[[Mapping[str, np.ndarray]], Arrays]


class BatchObserver(Protocol):
    def batch_finished(
        self,
        model: str,
        rows: int,
        queue_seconds: Sequence[float],
        compute_seconds: float,
        ok: bool,
    ) -> None: ...


@dataclass(slots=True)
class BatcherStats:
    queued: int = 0  # live requests waiting
    runs: int = 0  # executor runs so far
    requests_run: int = 0
    rows_run: int = 0
    dropped_cancelled: int = 0
    rejected: int = 0


class _Pending(NamedTuple):
    """A queued call. Made with ``_new_pending`` (tuple.__new__, no Python-level
    constructor): one per ctx.infer, so its cost counts."""

    inputs: Mapping[str, np.ndarray]
    rows: int
    future: asyncio.Future[Arrays]
    outputs: Sequence[str] | None
    enqueued: float
    traced: object  # the caller's span context (tracing on), linked from its batch's span


_new_pending = tuple.__new__
_perf_counter = time.perf_counter


class DynamicBatcher:
    """Batches calls to ``run`` for one model; ``run`` executes on ``executor``."""

    def __init__(
        self,
        model: str,
        run: RunFn,
        config: BatchingConfig,
        executor: Executor,
        observer: BatchObserver | None = None,
        spans: Spans | None = None,
    ) -> None:
        self._model = model
        self._spans = spans
        self._run = run
        self._stack = config.max_batch_size > 0
        # Ragged calls (an encoder's sequences): zero-padded on axis 1 to the batch's longest.
        self._pad = self._stack and config.pad_ragged
        self._max_rows = max(config.max_batch_size, 1)
        self._delay = config.max_queue_delay_us / 1e6
        self._max_queue = config.max_queue_size
        self._executor = executor
        self._observer = observer
        self._queue: deque[_Pending] = deque()
        self._rows_waiting = 0
        # Rows waiting at which an arrival wakes the worker; 0 while it is busy running.
        self._wake_at = 1
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        # The loop the worker runs on; cached because asyncio.get_running_loop() costs a
        # getpid() system call on every call (CPython's fork check).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._drain = False  # closing, but queued calls still run (a reload)
        self.stats = BatcherStats()

    def start(self) -> None:
        if self._worker is None:
            self._loop = loop = asyncio.get_running_loop()
            self._worker = loop.create_task(self._work(), name=f"batcher:{self._model}")

    async def aclose(self, *, drain: bool = False) -> None:
        """Take no new calls and answer every caller held: the batch running now finishes
        and its callers get their results; queued calls run as well when ``drain`` (a
        reload: calls accepted by this version finish on it), else fail with UNAVAILABLE.
        Returns once the worker has stopped: nothing runs on the model after that.

        Cancelling ``aclose`` cancels the worker: the running batch's callers and the
        queued ones then fail with UNAVAILABLE (the model's thread finishes on its own).
        """
        self._closed = True
        self._drain = drain
        worker = self._worker
        if worker is not None:
            self._arrived.set()  # wake a worker waiting for work or for latecomers
            try:
                # wait() never raises the worker's errors, only our own cancellation.
                await asyncio.wait([worker])
            except asyncio.CancelledError:
                worker.cancel()
                await asyncio.wait([worker])
                self._fail_queued()
                raise
            self._worker = None
        self._fail_queued()

    def _fail_queued(self) -> None:
        while self._queue:
            pending = self._queue.popleft()
            self._uncount(pending)
            if not pending.future.done():
                pending.future.set_exception(Unavailable(f"model {self._model!r} was unloaded"))

    def submit_nowait(
        self,
        inputs: Mapping[str, np.ndarray],
        rows: int,
        outputs: Sequence[str] | None = None,
        traced: object = None,
    ) -> asyncio.Future[Arrays]:
        """Queue ``inputs`` (``rows`` rows along the batch dimension); the future gets the
        outputs (those named in ``outputs``, or all). Cancelling the future before its batch
        forms drops the rows. ``traced``: the caller's span context, which the batch's span
        links to (tracing on).

        Raises ResourceExhausted when the queue is full, Unavailable when closed.
        """
        if self._closed:
            raise Unavailable(f"model {self._model!r} is not loaded")
        if self._pad:
            _check_ragged(self._model, inputs)
        if self.stats.queued >= self._max_queue:
            self.stats.rejected += 1
            raise ResourceExhausted(
                f"model {self._model!r} has {self.stats.queued} requests queued (the limit)"
            )
        if self._worker is None:
            self.start()
        future: asyncio.Future[Arrays] = self._loop.create_future()  # type: ignore[union-attr]
        self._queue.append(
            _new_pending(_Pending, (inputs, rows, future, outputs, _perf_counter(), traced))
        )
        self.stats.queued += 1
        self._rows_waiting += rows
        if self._wake_at and self._rows_waiting >= self._wake_at:
            self._arrived.set()
        return future

    async def submit(
        self, inputs: Mapping[str, np.ndarray], rows: int, outputs: Sequence[str] | None = None
    ) -> Arrays:
        """``submit_nowait`` and await the result; cancellation drops the rows."""
        return await self.submit_nowait(inputs, rows, outputs)

    def _uncount(self, pending: _Pending) -> None:
        self.stats.queued -= 1
        self._rows_waiting -= pending.rows

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if batch is None:
                return  # closed, and nothing left to run
            if not batch:
                continue
            inputs: Mapping[str, np.ndarray]
            lengths = None
            if self._pad and len(batch) > 1:
                inputs, lengths = _stack_padded([p.inputs for p in batch])
            else:
                inputs = _stack([p.inputs for p in batch]) if self._stack else batch[0].inputs
            started = time.perf_counter()
            queue_seconds = [started - p.enqueued for p in batch]
            rows = sum(p.rows for p in batch)
            batch_span = run_span = None
            if self._spans is not None:
                traced = [p.traced for p in batch if p.traced is not None]
                if traced:
                    batch_span = self._spans.batch(self._model, traced, rows, max(queue_seconds))
                    run_span = self._spans.model_run(self._model, batch_span)
            try:
                outputs = await loop.run_in_executor(self._executor, self._run, inputs)
            except asyncio.CancelledError:
                # Cancelled while the model ran (a close that was itself cancelled): the
                # batch's callers must still hear; the thread's result is dropped.
                error = Unavailable(f"model {self._model!r} was unloaded while its batch ran")
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(error)
                _end_spans(batch_span, run_span, error)
                raise
            except Exception as exc:  # the model failed: every caller in the batch hears why
                _end_spans(batch_span, run_span, exc)
                self._observe(rows, queue_seconds, started, ok=False)
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                continue
            if batch_span is not None:
                _end_spans(batch_span, run_span, None)
            self._observe(rows, queue_seconds, started, ok=True)
            self.stats.runs += 1
            self.stats.requests_run += len(batch)
            self.stats.rows_run += rows
            if lengths is not None:
                _split_padded(batch, outputs, lengths)
            elif not self._stack or len(batch) == 1:
                for pending in batch:
                    if not pending.future.done():
                        keys = pending.outputs or outputs
                        pending.future.set_result({k: outputs[k] for k in keys})
            elif rows == len(batch):
                _split_rows(batch, outputs)
            else:
                _split(batch, outputs)

    async def _next_batch(self) -> list[_Pending] | None:
        """Wait for work, give latecomers up to the queue delay, then take a batch. None
        once closed (and, when draining, once the queue is empty)."""
        while True:
            if self._closed and not self._drain:
                return None
            if self._live_head():
                break
            if self._closed:
                return None  # drained
            self._arrived.clear()
            self._wake_at = 1  # any arrival wakes the worker
            await self._arrived.wait()
        if (
            not self._closed
            and self._stack
            and self._delay > 0
            and self._rows_waiting < self._max_rows
        ):
            remaining = self._queue[0].enqueued + self._delay - time.perf_counter()
            if remaining > 0:
                # Only a full batch ends the wait early: waking on every arrival would cost
                # a timer and a task switch per request.
                self._arrived.clear()
                self._wake_at = self._max_rows
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await self._arrived.wait()
                if self._closed and not self._drain:
                    return None
        self._wake_at = 0
        batch: list[_Pending] = []
        rows = 0
        queue, stats, limit = self._queue, self.stats, self._max_rows
        while queue:
            pending = queue[0]
            if pending.future.done():  # cancelled while waiting: its row is dropped
                queue.popleft()
                self._uncount(pending)
                stats.dropped_cancelled += 1
                continue
            if batch and (not self._stack or rows + pending.rows > limit):
                break
            queue.popleft()
            batch.append(pending)
            rows += pending.rows
        stats.queued -= len(batch)
        self._rows_waiting -= rows
        return batch

    def _live_head(self) -> bool:
        while self._queue and self._queue[0].future.done():
            pending = self._queue.popleft()
            self._uncount(pending)
            self.stats.dropped_cancelled += 1
        return bool(self._queue)

    def _observe(self, rows: int, queue_seconds: list[float], started: float, ok: bool) -> None:
        if self._observer is not None:
            self._observer.batch_finished(
                self._model, rows, queue_seconds, time.perf_counter() - started, ok
            )


def _end_spans(batch: Any, run: Any, error: BaseException | None) -> None:
    """End a batch's spans (tracing on): the model run, then the batch."""
    if batch is None:
        return
    if error is not None:
        for span in (run, batch):
            span.record_exception(error)
            span.set_attribute("agentd.error", type(error).__name__)
    run.end()
    batch.end()


def _split(batch: list[_Pending], outputs: Arrays) -> None:
    """Give each caller views of its rows of the batch output: no copy per caller."""
    start = 0
    for pending in batch:
        end = start + pending.rows
        if not pending.future.done():
            keys = pending.outputs or outputs
            pending.future.set_result({k: outputs[k][start:end] for k in keys})
        start = end


def _split_rows(batch: list[_Pending], outputs: Arrays) -> None:
    """``_split`` for a batch of one-row calls (the common case: one agent, one row).

    An output's rows are cut into one-row views in one C loop (``list`` over a reshaped
    view), taken only for outputs somebody asked for: slicing in Python per caller cost
    more than the model itself. Callers asking for the same outputs share one plan.
    """
    views: dict[str, list[np.ndarray]] = {}
    plans: dict[int, list[tuple[str, list[np.ndarray]]]] = {}
    n = len(batch)
    for index, pending in enumerate(batch):
        future = pending.future
        if future.done():
            continue
        wanted = pending.outputs
        plan = plans.get(id(wanted))  # the batch holds every ``wanted``: ids stay unique
        if plan is None:
            plan = plans[id(wanted)] = []
            for key in wanted or outputs:
                rows = views.get(key)
                if rows is None:
                    rows = views[key] = _row_views(outputs[key], n)
                plan.append((key, rows))
        if len(plan) == 1:
            key, rows = plan[0]
            future.set_result({key: rows[index]})
        else:
            future.set_result({key: rows[index] for key, rows in plan})


def _row_views(array: np.ndarray, n: int) -> list[np.ndarray]:
    """``array`` cut into ``n`` one-row views."""
    if array.ndim and array.shape[0] == n:
        return list(array.reshape(n, 1, *array.shape[1:]))
    return [array[i : i + 1] for i in range(n)]  # not one row per call: as _split would


def _stack(requests: list[Mapping[str, np.ndarray]]) -> Arrays:
    if len(requests) == 1:
        return dict(requests[0])
    return {name: np.concatenate([r[name] for r in requests]) for name in requests[0]}


def _check_ragged(model: str, inputs: Mapping[str, np.ndarray]) -> None:
    """A padded model's call: every input has a sequence axis (axis 1) of one length."""
    lengths = {a.shape[1] if a.ndim >= 2 else None for a in inputs.values()}
    if None in lengths or len(lengths) > 1:
        shapes = {name: list(a.shape) for name, a in inputs.items()}
        raise InvalidArgument(
            f"model {model!r} pads sequences: every input needs the same length on "
            f"axis 1, got shapes {shapes}"
        )


def _stack_padded(requests: list[Mapping[str, np.ndarray]]) -> tuple[Arrays, list[int]]:
    """The calls stacked, each zero-padded on axis 1 to the longest; each call's length."""
    lengths = [next(iter(r.values())).shape[1] for r in requests]
    longest = max(lengths)
    stacked: Arrays = {}
    for name, first in requests[0].items():
        rows = sum(r[name].shape[0] for r in requests)
        out = np.zeros((rows, longest, *first.shape[2:]), dtype=first.dtype)
        start = 0
        for request, length in zip(requests, lengths, strict=True):
            array = request[name]
            out[start : start + array.shape[0], :length] = array
            start += array.shape[0]
        stacked[name] = out
    return stacked, lengths


def _split_padded(batch: list[_Pending], outputs: Arrays, lengths: list[int]) -> None:
    """``_split`` for padded calls: each caller's rows, cut back to its own length on
    axis 1 in outputs that carry the sequence axis (e.g. last_hidden_state)."""
    longest = max(lengths)
    start = 0
    for pending, length in zip(batch, lengths, strict=True):
        end = start + pending.rows
        if not pending.future.done():
            keys = pending.outputs or outputs
            result = {}
            for key in keys:
                array = outputs[key][start:end]
                if array.ndim >= 2 and array.shape[1] == longest:
                    array = array[:, :length]
                result[key] = array
            pending.future.set_result(result)
        start = end
