"""Virtual actors: agent instances activated on their first message, one turn at a time.

An activation is a small object (no task, no queue of its own until messages wait). When
a message arrives for an idle activation it is put on the worker pool's run queue; a
worker runs one turn, persists the state if the turn changed it, and puts the activation
back on the queue if more messages wait. Idle activations are passivated after
``idle_seconds``; their state is already in the store.

When a commit fails, the agents in it go back to what the store holds (the last committed
snapshot): their in-memory state is dropped and read again before their next turn, the
store drops their saves still queued, and a turn that was running on the dropped state
fails with UNAVAILABLE instead of saving it. So a failed call never counts, and a retry
applies its change once.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import orjson

from agentd.agents.address import Address, parse_address
from agentd.agents.base import Agent, Context
from agentd.agents.registry import AgentRegistry
from agentd.deadlines import DeadlinePolicy
from agentd.errors import (
    AgentdError,
    DeadlineExceeded,
    Internal,
    ResourceExhausted,
    Unavailable,
)
from agentd.runtime.pool import WorkerPool
from agentd.runtime.state import StateStore

if TYPE_CHECKING:
    from agentd.generate.service import GenerationService
    from agentd.tools.service import ToolService

__all__ = ["ActorHost", "Inference", "TurnObserver"]

log = logging.getLogger(__name__)

_END = object()  # closes a turn's event stream
_NO_MESSAGE = object()  # an activation's next_message when none waits
# No stored row loads as an empty state, so an agent whose state is still empty has
# nothing to store: stateless agents (echo) leave no rows behind.
_EMPTY_SNAPSHOTS = (b"", b"{}")
_TURNS_PER_RUN = 64
_STOPPED = -1.0  # an activation's turn_deadline once the watchdog stopped its told turn
_perf_counter = time.perf_counter
_dumps = orjson.dumps
_monotonic = time.monotonic


class TurnObserver(Protocol):
    def turn_finished(self, agent_type: str, outcome: str, seconds: float) -> None: ...


class Inference(Protocol):
    def infer_nowait(
        self,
        name: str,
        inputs: Mapping[str, np.ndarray],
        *,
        version: str | None = None,
        outputs: Sequence[str] | None = None,
    ) -> asyncio.Future[dict[str, np.ndarray]]: ...


class _Envelope:
    __slots__ = ("deadline", "events", "message", "reply", "started", "timer")

    def __init__(
        self,
        message: Any,
        reply: asyncio.Future | None,
        deadline: float | None,
        events: asyncio.Queue | None,
    ) -> None:
        self.message = message
        self.reply = reply
        self.deadline = deadline
        self.events = events
        # Set when its turn begins: from then on the turn's own timeout answers the
        # deadline (and a turn that finished waits for its commit, not for the clock).
        self.started = False
        # Answers the caller at the deadline while the call waits (see ActorHost.ask);
        # cancelled by the caller once it has its answer.
        self.timer: asyncio.TimerHandle | None = None

    def dead(self) -> bool:
        """Nobody waits for it any more (its caller gave up or its deadline passed)."""
        return self.reply is not None and self.reply.done()


class _Activation:
    """One live agent instance. Run by the pool as a job: each ``run`` is one turn."""

    __slots__ = (
        "address",
        "agent",
        "host",
        "last_turn",
        "mailbox",
        "next_message",
        "scheduled",
        "snapshot",
        "state",
        "turn_deadline",
    )

    def __init__(self, address: Address, agent: Agent, host: ActorHost) -> None:
        self.address = address
        self.agent = agent
        self.host = host
        # Waiting messages: the first in ``next_message`` (a slot, no allocation: most
        # agents get one message at a time), more in ``mailbox``, a deque allocated only
        # while two or more wait (a deque costs ~0.7 µs and a 600-byte block to make).
        self.next_message: Any = _NO_MESSAGE
        self.mailbox: deque[Any] | None = None
        self.scheduled = False
        self.state: dict[str, Any] | None = None  # None until loaded from the store
        self.snapshot = b""
        self.last_turn = 0.0
        # The deadline of the told turn running now (loop clock), 0.0 when none runs,
        # _STOPPED once the host's watchdog has cancelled it.
        self.turn_deadline = 0.0

    async def run(self) -> None:
        """Run up to ``_TURNS_PER_RUN`` waiting messages, one turn each, then yield the
        worker (requeued if more wait) so that busy agents do not starve the others.

        A mailbox holds bare messages for tells (nobody waits for them: the common case in
        a swarm, run inline here without the bookkeeping replies and deadlines need) and
        ``_Envelope`` objects for asks and streams (run by ``_turn``).
        """
        host = self.host
        observer = host._observer
        told_timeout = host._told_timeout
        try:
            for _ in range(_TURNS_PER_RUN):
                message = self.next_message
                if message is not _NO_MESSAGE:
                    self.next_message = _NO_MESSAGE
                else:
                    mailbox = self.mailbox
                    if not mailbox:
                        break
                    message = mailbox.popleft()
                host._waiting -= 1
                if type(message) is _Envelope:
                    if self._expired(message):
                        continue  # the caller gave up or its deadline passed: never run
                    if self.state is None and not self._start_fresh():
                        if message.deadline is not None and message.timer is None:
                            # The load can take long (a slow store): the deadline must
                            # reach the caller meanwhile.
                            message.timer = asyncio.get_running_loop().call_at(
                                message.deadline, host._expire, message, self.address
                            )
                        if not await self._load_for(message) or self._expired(message):
                            continue  # the load failed, or the call expired while it ran
                    message.started = True
                    await self._turn(message)
                    continue
                if (
                    self.state is None
                    and not self._start_fresh()
                    and not await self._load_for(message)
                ):
                    continue
                timed = False
                if observer is not None:
                    host._until_observed -= 1
                    if host._until_observed <= 0:
                        host._until_observed = host._observe_every
                        timed = True
                        started = _perf_counter()
                outcome = "ok"
                try:
                    if told_timeout is None:
                        ctx = Context(self.address, self.state, None, host)  # type: ignore[arg-type]
                        await self.agent.handle(ctx, message)
                    else:
                        await self._told_turn(message, told_timeout)
                    state = self.state
                    if not state and (state is None or self.snapshot in _EMPTY_SNAPSHOTS):
                        # Still empty: nothing to serialise or store. Or None: a commit
                        # failed during the turn and dropped the state it ran on.
                        continue
                    try:
                        snapshot = _dumps(state)
                    except TypeError as exc:
                        raise Internal(
                            f"agent {self.address} state is not JSON-serialisable: {exc}"
                        ) from None
                    if snapshot != self.snapshot:
                        # orjson's result sits in a ~4 KiB buffer: keep an exact-size copy.
                        self.snapshot = snapshot = memoryview(snapshot).tobytes()
                        address = self.address
                        host.store.save_nowait(address.type + "/" + address.id, snapshot)
                except asyncio.CancelledError:
                    self._rollback()
                    outcome = "cancelled"
                    raise
                except _TurnStopped:
                    self._rollback()
                    outcome = "deadline"
                    log.warning(
                        "agent %s: a told turn ran past its deadline (%gs) and was stopped",
                        self.address,
                        told_timeout,
                    )
                except Exception:
                    self._rollback()
                    outcome = "error"
                    log.exception("agent %s raised", self.address)
                finally:
                    host._turns += 1
                    if timed:
                        observer.turn_finished(  # type: ignore[union-attr]
                            self.address.type, outcome, _perf_counter() - started
                        )
                    elif outcome == "deadline" and observer is not None:
                        # Sampled timing aside, every stopped turn is counted.
                        observer.turn_finished(self.address.type, outcome, told_timeout)  # type: ignore[arg-type]
        finally:
            self.last_turn = _monotonic()
            if self.next_message is not _NO_MESSAGE or self.mailbox:
                host.pool.requeue(self)
            else:
                self.mailbox = None
                self.scheduled = False

    async def _told_turn(self, message: Any, timeout: float) -> None:
        """Run a told turn that has the default deadline, counted from its start (nobody
        waits for it). The host's watchdog cancels it once the deadline has passed (see
        ``ActorHost._watch_told_turns``): that cancellation is taken back here and raised
        as _TurnStopped; any other one (the pool shutting down) goes on up."""
        host = self.host
        deadline = host._loop_time() + timeout
        self.turn_deadline = deadline
        try:
            await self.agent.handle(Context(self.address, self.state, deadline, host), message)  # type: ignore[arg-type]
        except asyncio.CancelledError:
            if self.turn_deadline == _STOPPED:
                self.turn_deadline = 0.0
                if asyncio.current_task().uncancel() == 0:  # type: ignore[union-attr]
                    raise _TurnStopped from None
                # Another cancellation came with the stop: the worker's, so it goes on up.
            raise
        finally:
            if self.turn_deadline == _STOPPED:
                # The agent caught the stop's CancelledError: take the request back, or it
                # would hit the worker's next turn.
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
            self.turn_deadline = 0.0

    def _expired(self, envelope: _Envelope) -> bool:
        """True (the caller answered, if its deadline passed) when ``envelope``'s turn must
        not start: its caller gave up, or its deadline passed while it waited."""
        if envelope.dead():
            return True
        deadline = envelope.deadline
        if deadline is not None and deadline <= asyncio.get_running_loop().time():
            # Due, and its timer has not run yet (it fires in this loop iteration).
            self.host._expire(envelope, self.address)
            return True
        return False

    def waiting(self) -> int:
        """Messages waiting."""
        queued = len(self.mailbox) if self.mailbox is not None else 0
        return queued + (self.next_message is not _NO_MESSAGE)

    def push(self, message: Any, limit: int) -> None:
        """Queue ``message`` after those waiting; ResourceExhausted at ``limit`` waiting
        (after dropping the asks that expired while they waited)."""
        mailbox = self.mailbox
        if mailbox is None:
            if self.next_message is _NO_MESSAGE:
                self.next_message = message
                return
            if limit > 1:
                mailbox = self.mailbox = deque()
        if mailbox is None or len(mailbox) + (self.next_message is not _NO_MESSAGE) >= limit:
            if not self._drop_dead():
                raise ResourceExhausted(f"agent {self.address} has {limit} messages waiting")
            if self.next_message is _NO_MESSAGE:
                self.next_message = message
                return
            mailbox = self.mailbox
            assert mailbox is not None
        mailbox.append(message)

    def _drop_dead(self) -> int:
        """Drop the waiting asks nobody waits for any more (expired or abandoned), keeping
        the order of the others; returns how many were dropped."""
        mailbox = self.mailbox
        waiting = list(mailbox) if mailbox else []
        if self.next_message is not _NO_MESSAGE:
            waiting.insert(0, self.next_message)
        live = [m for m in waiting if type(m) is not _Envelope or not m.dead()]
        dropped = len(waiting) - len(live)
        if not dropped:
            return 0
        self.host._waiting -= dropped
        self.next_message = live.pop(0) if live else _NO_MESSAGE
        if mailbox is not None:
            mailbox.clear()
            mailbox.extend(live)
        return dropped

    def drop_if_expired(self) -> bool:
        """For the worker pool, on this activation's place in a full run queue: True (and
        no longer scheduled) when every message waiting is an ask nobody waits for."""
        self._drop_dead()
        if self.next_message is not _NO_MESSAGE:
            return False
        self.mailbox = None
        self.scheduled = False
        return True

    def unpush(self) -> None:
        """Take back the message ``push`` just queued."""
        if self.mailbox:
            self.mailbox.pop()
        else:
            self.next_message = _NO_MESSAGE

    def _start_fresh(self) -> bool:
        """Give a new activation an empty state when the store cannot hold one for it
        (then no load is needed: True)."""
        host = self.host
        if host.store.empty_at_open and (
            not host._stored_since_open or self.address not in host._stored_since_open
        ):
            self.state = {}
            return True
        return False

    async def _load(self) -> None:
        snapshot = await self.host.store.load(self._key())
        self.snapshot = snapshot or b""
        self.state = orjson.loads(snapshot) if snapshot else {}

    async def _load_for(self, message: Any) -> bool:
        """Load the state before ``message``'s turn; False (the message failed with
        UNAVAILABLE, or logged for a tell) when the store cannot read it."""
        try:
            await self._load()
            return True
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = Unavailable(f"agent {self.address}: its state could not be read: {exc}")
            if type(message) is _Envelope:
                _fail(message.reply, error)
                if message.events is not None:
                    message.events.put_nowait(_END)
            else:
                log.error("a message to %s was dropped: %s", self.address, error.message)
            return False

    def drop_state(self) -> None:
        """Forget the in-memory state (a commit of it failed): the next turn reads the
        last committed snapshot from the store, and a running turn will not save."""
        self.state = None
        self.snapshot = b""
        # The store may hold a row for this agent even if it started empty.
        self.host._stored_since_open.add(self.address)

    def _key(self) -> str:
        address = self.address
        return address.type + "/" + address.id  # str(address), without a call into Python

    async def _turn(self, envelope: _Envelope) -> None:
        host = self.host
        started = _perf_counter()
        outcome = "error"
        reply, events = envelope.reply, envelope.events
        # A caller that gives up (disconnect, its own timeout) cancels this turn.
        watch = None
        if reply is not None:
            watch = _CancelTurnWhenAbandoned(asyncio.current_task())  # type: ignore[arg-type]
            reply.add_done_callback(watch)
        try:
            ctx = Context(self.address, self.state, envelope.deadline, host)  # type: ignore[arg-type]
            if envelope.deadline is None and events is None:
                result = await self.agent.handle(ctx, envelope.message)  # the common path
            else:
                async with asyncio.timeout_at(envelope.deadline):
                    if events is None:
                        result = await self.agent.handle(ctx, envelope.message)
                    else:
                        result = None
                        async for event in self.agent.stream(ctx, envelope.message):
                            await events.put(event)
            if self.state is None:
                # A commit failed while this turn ran and dropped the state it changed.
                raise Unavailable(
                    f"agent {self.address}: an earlier change to its state could not be "
                    "saved; this turn was not applied, try again"
                )
            committed = self._persist()
            outcome = "ok"
            if reply is not None and not reply.done():
                if committed is None:
                    reply.set_result(result)
                else:
                    # The caller hears back once the state it caused is durable; the
                    # worker does not wait for that and moves on.
                    committed.add_done_callback(functools.partial(_answer, reply, result))
        except TimeoutError:
            outcome = "deadline"
            self._rollback()
            _fail(reply, DeadlineExceeded(f"agent {self.address} did not finish in time"))
        except asyncio.CancelledError:
            self._rollback()
            outcome = "cancelled"
            if watch is not None and watch.fired:
                watch.fired = False  # its cancellation request is taken back here
                if watch.task.uncancel() == 0:
                    return  # only the caller gave up: this turn ends, the worker goes on
                # Another cancellation landed with the abandonment (the pool shutting
                # down): it is the worker's, so it goes on up.
            _fail(reply, Unavailable("the runtime is shutting down"))
            raise
        except AgentdError as exc:
            self._rollback()
            _fail(reply, exc)
        except Exception as exc:
            self._rollback()
            log.exception("agent %s raised", self.address)
            _fail(reply, Internal(f"agent {self.address} failed: {type(exc).__name__}: {exc}"))
        finally:
            if watch is not None and reply is not None:
                reply.remove_done_callback(watch)
                watch.turn_over = True
                if watch.fired:
                    # The agent caught the abandonment's CancelledError and finished:
                    # take the request back, or it would count against the worker's next
                    # turns (a later abandonment would then look like a shutdown).
                    watch.task.uncancel()
            if events is not None:
                events.put_nowait(_END)
            host._turn_finished(self.address.type, outcome, _perf_counter() - started)

    def _snapshot_if_changed(self) -> bytes | None:
        """The state serialised, when it differs from the last snapshot (then it becomes
        the snapshot); None when the turn left it as it was."""
        try:
            snapshot = orjson.dumps(self.state)
        except TypeError as exc:
            raise Internal(f"agent {self.address} state is not JSON-serialisable: {exc}") from None
        if snapshot == self.snapshot or (snapshot == b"{}" and not self.snapshot):
            return None  # unchanged (no row and an empty state read the same)
        # orjson's result sits in a ~4 KiB buffer; keep an exact-size copy instead.
        self.snapshot = snapshot = memoryview(snapshot).tobytes()
        return snapshot

    def _persist(self) -> asyncio.Future[None] | None:
        """Queue the state for commit if the turn changed it; the commit's future (None
        when nothing changed)."""
        snapshot = self._snapshot_if_changed()
        if snapshot is None:
            return None
        return self.host.store.save(self._key(), snapshot)

    def _rollback(self) -> None:
        # A failed turn leaves the state of the last good turn (None stays None: a failed
        # commit dropped the state, to be read again from the store).
        if self.state is not None:
            self.state = orjson.loads(self.snapshot) if self.snapshot else {}


class _TurnStopped(Exception):
    """A told turn ran past its deadline and was stopped."""


class _CancelTurnWhenAbandoned:
    __slots__ = ("fired", "task", "turn_over")

    def __init__(self, task: asyncio.Task) -> None:
        self.task = task
        self.fired = False
        self.turn_over = False

    def __call__(self, reply: asyncio.Future) -> None:
        if reply.cancelled() and not self.turn_over:
            self.fired = True
            self.task.cancel()


def _answer(reply: asyncio.Future, result: Any, committed: asyncio.Future) -> None:
    if reply.done():
        return
    error = None if committed.cancelled() else committed.exception()
    if committed.cancelled() or error is not None:
        # The store logs its failures (a few lines, not one per call).
        log.debug("agent state commit failed: %s", error)
        reply.set_exception(Unavailable(f"the agent's state could not be saved: {error}"))
    else:
        reply.set_result(result)


def _running_loop_time() -> float:
    return asyncio.get_running_loop().time()


def _fail(reply: asyncio.Future | None, error: BaseException) -> None:
    if reply is not None and not reply.done():
        reply.set_exception(error)


class ActorHost:
    """Owns the activations of one node, the worker pool and the state store."""

    def __init__(
        self,
        registry: AgentRegistry,
        store: StateStore,
        *,
        pool: WorkerPool,
        inference: Inference | None = None,
        generation: GenerationService | None = None,
        tools: ToolService | None = None,
        observer: TurnObserver | None = None,
        observe_every: int = 1,
        idle_seconds: float = 300.0,
        max_mailbox: int = 1_000_000,
        max_active: int = 2_000_000,
        freeze_every: int = 0,
        deadlines: DeadlinePolicy | None = None,
    ) -> None:
        self.registry = registry
        self.store = store
        self.pool = pool
        self.inference = inference
        # The node's language models (ctx.generate) and sandboxed tools (ctx.tool).
        self.generation = generation
        self.tools = tools
        self._observer = observer
        # Turns told (nobody waits for them) are timed and reported to the observer one in
        # ``observe_every``: a sampled latency picture without two clock reads and a call
        # on every turn. Asks and streams are always reported.
        self._observe_every = max(1, observe_every)
        self._until_observed = 1
        self._idle_seconds = idle_seconds
        self._max_mailbox = max_mailbox
        self._max_active = max_active
        self._activations: dict[Address, _Activation] = {}
        self._active_by_type: defaultdict[str, int] = defaultdict(int)
        self._passivated = 0
        self._created = 0
        self._waiting = 0  # messages in all mailboxes
        self._freeze_every = freeze_every
        # Addresses passivated by this process: the only ones a store that was empty when
        # opened can hold, so other activations skip the load.
        self._stored_since_open: set[Address] = set()
        self._turns = 0
        self._sweeper: asyncio.Task[None] | None = None
        # The node's deadline rule (agentd.deadlines): asks and tells without a timeout of
        # their own get its default; told turns get it from their start. None: no limits.
        self._deadlines = deadlines or DeadlinePolicy()
        self._told_timeout = self._deadlines.default_s
        self._loop_time = _running_loop_time  # the loop's own clock once started
        self._watchdog: asyncio.Task[None] | None = None
        store.on_commit_failed = self._commit_failed

    async def start(self) -> None:
        await self.store.open()
        self.pool.start()
        loop = asyncio.get_running_loop()
        self._loop_time = loop.time
        self._sweeper = loop.create_task(self._sweep_forever(), name="passivation")
        if self._told_timeout is not None:
            self._watchdog = loop.create_task(
                self._watch_told_turns(self._told_timeout), name="told-turn-deadlines"
            )

    async def aclose(self, grace: float = 10.0) -> None:
        for task in (self._sweeper, self._watchdog):
            if task is not None:
                task.cancel()
                await asyncio.wait([task])
        await self.pool.aclose(timeout=grace)
        await self.store.aclose()

    # -- messaging ----------------------------------------------------------------------

    async def tell(
        self, address: str | Address, message: Any, *, timeout: float | None = None
    ) -> None:
        """Deliver without waiting for the turn; waits while the run queue is full, for at
        most ``timeout`` (else the host's default deadline), then DeadlineExceeded (nothing
        delivered)."""
        if self.tell_nowait(address, message):
            return
        timeout = self._deadlines.timeout(timeout)
        if timeout is None:  # no limit configured: no timer (a swarm's burst of tells)
            while not self.tell_nowait(address, message):
                await self.pool.wait_for_room()
            return
        try:
            async with asyncio.timeout(timeout):
                while not self.tell_nowait(address, message):
                    await self.pool.wait_for_room()
        except TimeoutError:
            raise DeadlineExceeded(
                f"the run queue had no room for a message to {address} within {timeout:g}s"
            ) from None

    def tell_nowait(self, address: str | Address, message: Any) -> bool:
        """Deliver without waiting; False (nothing delivered) when the agent would need a
        place on a full run queue. Raises for unknown or malformed addresses and a full
        mailbox."""
        activation = self._activations.get(address)  # type: ignore[call-overload]
        if activation is None:
            activation = self._activation_missed(address)
        if activation.scheduled:
            # Already on the run queue (or running): it will see the message.
            mailbox = activation.mailbox
            if mailbox is not None and len(mailbox) + 1 < self._max_mailbox:
                mailbox.append(message)  # the common case of a busy agent, inline
            else:
                activation.push(message, self._max_mailbox)
            self._waiting += 1
            return True
        pool = self.pool
        if pool.full():
            return False
        # Idle: a bare message (nobody waits for it) and a place on the run queue.
        activation.push(message, self._max_mailbox)
        self._waiting += 1
        try:
            pool.submit_nowait(activation)
        except AgentdError:
            activation.unpush()
            self._waiting -= 1
            raise
        activation.scheduled = True
        return True

    def tell_many_nowait(
        self, addresses: Sequence[str | Address], messages: Sequence[Any], start: int = 0
    ) -> int:
        """``tell_nowait(addresses[i], messages[i])`` for ``i`` from ``start`` on, in order,
        in one pass (a burst of tells, e.g. to many new agents); stops before the first
        message whose agent would need a place on a full run queue. Returns the index of
        the first message not delivered (``len(addresses)`` when all were). Raises as
        ``tell_nowait`` does; the messages before the failing one stay delivered.
        """
        pool = self.pool
        room = pool.room()
        activations = self._activations
        limit = self._max_mailbox
        newly: list[_Activation] = []  # idle agents that now have a message: to queue
        index, end = start, len(addresses)
        try:
            while index < end:
                address = addresses[index]
                activation = activations.get(address)  # type: ignore[call-overload]
                if activation is None:
                    activation = self._activation_missed(address)
                if activation.scheduled:
                    activation.push(messages[index], limit)
                else:
                    # Idle, so nothing waits: the message takes the slot (or the empty deque).
                    if len(newly) == room:
                        break
                    if activation.mailbox is None:
                        activation.next_message = messages[index]
                    else:
                        activation.push(messages[index], limit)
                    activation.scheduled = True
                    newly.append(activation)
                self._waiting += 1
                index += 1
        finally:
            pool.submit_many_nowait(newly)  # fits: room was counted and nothing ran since
        return index

    async def ask(
        self, address: str | Address, message: Any, *, timeout: float | None = None
    ) -> Any:
        """Deliver and await the reply. Raises ResourceExhausted when the run queue is
        full, DeadlineExceeded past ``timeout`` (else the host's default deadline; the turn
        is cancelled), or the turn's error."""
        loop = asyncio.get_running_loop()
        timeout = self._deadlines.timeout(timeout)
        deadline = None if timeout is None else loop.time() + timeout
        reply: asyncio.Future[Any] = loop.create_future()
        activation = self._activation(address)
        envelope = _Envelope(message, reply, deadline, None)
        if not self._deliver_nowait(activation, envelope) and deadline is not None:
            # It waits (run queue, mailbox): the deadline must reach it there, so that the
            # caller hears at its deadline, not when a worker frees up. A call a worker
            # takes at once needs no timer: its turn's own timeout covers it.
            envelope.timer = loop.call_at(deadline, self._expire, envelope, activation.address)
        try:
            return await reply
        except asyncio.CancelledError:
            reply.cancel()  # reaches the running turn (and its queued inference)
            if not envelope.started:
                self.pool.mark_stale()
            raise
        finally:
            if envelope.timer is not None:
                envelope.timer.cancel()

    async def ask_stream(
        self, address: str | Address, message: Any, *, timeout: float | None = None
    ) -> AsyncIterator[Any]:
        """Run a streaming turn and yield its events, within ``timeout`` (else the host's
        default deadline)."""
        loop = asyncio.get_running_loop()
        timeout = self._deadlines.timeout(timeout)
        deadline = None if timeout is None else loop.time() + timeout
        reply: asyncio.Future[Any] = loop.create_future()
        events: asyncio.Queue[Any] = asyncio.Queue(maxsize=64)
        activation = self._activation(address)
        envelope = _Envelope(message, reply, deadline, events)
        if not self._deliver_nowait(activation, envelope) and deadline is not None:
            envelope.timer = loop.call_at(deadline, self._expire, envelope, activation.address)
        try:
            while True:
                get = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({get, reply}, return_when=asyncio.FIRST_COMPLETED)
                if get in done:
                    event = get.result()
                    if event is _END:
                        break
                    yield event
                else:
                    get.cancel()
                    if reply.exception() is not None:
                        raise reply.exception()  # type: ignore[misc]
                    # Finished: drain what is left.
                    while (event := events.get_nowait()) is not _END:
                        yield event
                    return
            await reply
        finally:
            if envelope.timer is not None:
                envelope.timer.cancel()
            if not reply.done():
                reply.cancel()
                if not envelope.started:
                    self.pool.mark_stale()

    def _expire(self, envelope: _Envelope, address: Address) -> None:
        """``envelope``'s deadline passed: if its turn has not started, answer the caller
        now (the turn will never start) and let the run queue drop the dead place."""
        if envelope.started or envelope.dead():
            return
        _fail(
            envelope.reply,
            DeadlineExceeded(f"agent {address}: the deadline passed before the call could run"),
        )
        self.pool.mark_stale()

    def _deliver_nowait(self, activation: _Activation, envelope: Any) -> bool:
        """Enqueue, scheduling the agent if idle; undone and re-raised when the run queue
        refuses it (full or closing). True when a worker takes it at once (the agent was
        idle and a worker was waiting), False when it waits."""
        activation.push(envelope, self._max_mailbox)
        self._waiting += 1
        if activation.scheduled:
            return False  # behind the agent's running turn or its place on the run queue
        try:
            at_once = self.pool.submit_nowait(activation)
        except AgentdError:
            activation.unpush()
            self._waiting -= 1
            raise
        activation.scheduled = True
        return at_once

    def _activation(self, address: str | Address) -> _Activation:
        """The activation for ``address``, made on first use."""
        activation = self._activations.get(address)  # type: ignore[call-overload]
        if activation is None:
            activation = self._activation_missed(address)
        return activation

    def _activation_missed(self, address: str | Address) -> _Activation:
        """After ``address`` missed in the activations: a string is parsed (raising
        InvalidArgument) and looked up as an Address; an Address has none, so make one.
        The senders' hot paths look up first themselves and call this only on a miss."""
        if isinstance(address, str):
            address = parse_address(address)
            activation = self._activations.get(address)
            if activation is not None:
                return activation
        return self._activate(address)

    def _activate(self, addr: Address) -> _Activation:
        """A new activation for ``addr`` (which has none)."""
        agent_type = self.registry.get(addr.type)
        activations = self._activations
        if len(activations) >= self._max_active and not self.passivate_idle(0):
            raise ResourceExhausted(f"{self._max_active} agents are active (the limit)")
        activation = activations[addr] = _Activation(addr, agent_type(), self)
        self._created = created = self._created + 1
        if self._freeze_every and created % self._freeze_every == 0:
            # Activations are long-lived: move them out of the collector's view so that
            # full collections do not rescan millions of agents (see docs/runtime.md).
            gc.freeze()
        self._active_by_type[addr.type] += 1
        return activation

    # -- inference for ctx.infer --------------------------------------------------------

    def infer_nowait(
        self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None
    ) -> asyncio.Future[dict[str, np.ndarray]]:
        if self.inference is None:
            raise Unavailable("this runtime has no inference service")
        return self.inference.infer_nowait(model, inputs, outputs=outputs)

    # -- lifecycle ----------------------------------------------------------------------

    def _commit_failed(self, keys: Collection[str], error: BaseException) -> None:
        """The store could not commit these agents' states: roll each back to its last
        committed snapshot (read again before its next turn)."""
        activations = self._activations
        for key in keys:
            try:
                address = parse_address(key)
            except AgentdError:
                continue
            activation = activations.get(address)
            if activation is not None:
                activation.drop_state()

    def store_failing(self) -> str | None:
        """Why the state store is failing (commits failed just now), or None."""
        return self.store.failing()

    def _turn_finished(self, agent_type: str, outcome: str, seconds: float) -> None:
        self._turns += 1
        if self._observer is not None:
            self._observer.turn_finished(agent_type, outcome, seconds)

    def passivate_idle(self, older_than: float) -> int:
        """Drop activations idle for ``older_than`` seconds (their state is stored)."""
        cutoff = time.monotonic() - older_than
        idle = [
            addr
            for addr, act in self._activations.items()
            if not act.scheduled and not act.waiting() and act.last_turn <= cutoff
        ]
        for addr in idle:
            activation = self._activations.pop(addr)
            self._active_by_type[addr.type] -= 1
            if activation.snapshot:
                self._stored_since_open.add(addr)
        self._passivated += len(idle)
        return len(idle)

    async def _watch_told_turns(self, timeout: float) -> None:
        """Stop told turns past their deadline: every ``timeout / 8`` (at most 1 s), cancel
        the workers running one. Not a timer per turn: with uvloop one costs ~6 µs, five
        times a whole told turn (docs/runtime.md); a turn is stopped within that tick."""
        every = min(1.0, max(0.01, timeout / 8))
        loop_time = self._loop_time
        while True:
            await asyncio.sleep(every)
            now = loop_time()
            for task, job in self.pool.running():
                deadline = getattr(job, "turn_deadline", 0.0)
                if 0.0 < deadline <= now:
                    job.turn_deadline = _STOPPED  # type: ignore[attr-defined]
                    task.cancel()

    async def _sweep_forever(self) -> None:
        interval = max(1.0, min(60.0, self._idle_seconds / 4))
        while True:
            await asyncio.sleep(interval)
            self.passivate_idle(self._idle_seconds)

    def instance(self, address: str | Address) -> Agent:
        """The agent object behind ``address`` (activating it if needed)."""
        return self._activation(address).agent

    @property
    def turns(self) -> int:
        """Turns finished so far (cheap; ``stats()`` scans every activation)."""
        return self._turns

    def active_counts(self) -> dict[str, int]:
        return dict(self._active_by_type)

    def gauges(self) -> dict[str, float]:
        """Cheap numbers for metrics (no scan over activations)."""
        pool = self.pool.statistics()
        return {
            "active_agents": len(self._activations),
            "passivated_agents": self._passivated,
            "messages_waiting": self._waiting,
            "pool_queued": pool.queued,
            "pool_busy": pool.busy,
            "pool_rejected": pool.rejected,
            "state_writes": getattr(self.store, "writes", 0),
            "state_commits": getattr(self.store, "commits", 0),
            "state_errors": self.store.errors,
            "state_failing": 1 if self.store.failing() is not None else 0,
        }
