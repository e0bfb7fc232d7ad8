"""One live agent instance: its mailbox, its state and the turns a worker runs for it.

An activation is a small object (no task, no queue of its own until messages wait). Its
lifecycle (:class:`Phase`)::

    IDLE ──message──► SCHEDULED (on the run queue) ──worker──► RUNNING ─┬─► IDLE
      ▲                   ▲                                            │
      │                   └──────── more messages wait (requeued) ─────┘
      └── passivated when idle long enough: PASSIVATED (dropped; its state is stored)

A worker runs up to ``TURNS_PER_RUN`` waiting messages, one turn each. After a turn that
changed the state, the state is serialised and queued for commit (:meth:`_persist`, the
one persistence path: the caller of an ask hears back once it is durable; a tell does not
wait). A turn that fails rolls the state back to the last snapshot.

When a commit fails, the agents in it go back to what the store holds (the last committed
snapshot): their in-memory state is dropped (:meth:`drop_state`) and read again before their
next turn, the store drops their saves still queued, and a turn that was running on the
dropped state fails with UNAVAILABLE instead of saving it. So a failed call never counts,
and a retry applies its change once.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson

from agentd.agents.address import Address
from agentd.agents.base import Agent
from agentd.agents.context import Context
from agentd.errors import AgentdError, DeadlineExceeded, Internal, Unavailable
from agentd.runtime.mailbox import END, NO_MESSAGE, Envelope, Mailbox, fail, fail_message

if TYPE_CHECKING:
    from agentd.observability.spans import Spans
    from agentd.runtime.host import ActorHost

__all__ = ["Activation", "Phase", "TurnStopped"]

log = logging.getLogger(__name__)


class Phase(enum.Enum):
    IDLE = "idle"  # nothing waits; not on the run queue
    SCHEDULED = "scheduled"  # messages wait; on the run queue
    RUNNING = "running"  # a worker runs its turns
    PASSIVATED = "passivated"  # dropped from the host's directory (state stored)


# Module-level aliases: the delivery paths compare phases by identity on every message.
IDLE = Phase.IDLE
SCHEDULED = Phase.SCHEDULED
RUNNING = Phase.RUNNING
PASSIVATED = Phase.PASSIVATED

# No stored row loads as an empty state, so an agent whose state is still empty has
# nothing to store: stateless agents (echo) leave no rows behind.
_EMPTY_SNAPSHOTS = (b"", b"{}")
TURNS_PER_RUN = 64  # then the worker is yielded, so busy agents do not starve the others
STOPPED = -1.0  # an activation's turn_deadline once the watchdog stopped its told turn
_perf_counter = time.perf_counter
_dumps = orjson.dumps
_monotonic = time.monotonic


class TurnStopped(Exception):
    """A told turn ran past its deadline and was stopped."""


class Activation(Mailbox):
    """One live agent instance. Run by the worker pool as a job: ``run`` runs its turns."""

    __slots__ = ("agent", "host", "last_turn", "phase", "snapshot", "state", "turn_deadline")

    def __init__(self, address: Address, agent: Agent, host: ActorHost) -> None:
        # The mailbox's fields set here, not through Mailbox.__init__: one call less for
        # each of a swarm's million activations.
        self.address = address
        self.next_message: Any = NO_MESSAGE
        self.mailbox = None
        self.agent = agent
        self.host = host
        self.phase = IDLE
        self.state: dict[str, Any] | None = None  # None until loaded from the store
        self.snapshot = b""  # the state as last queued for commit (b"": none stored)
        self.last_turn = 0.0
        # The deadline of the told turn running now (loop clock), 0.0 when none runs,
        # STOPPED once the host's watchdog has cancelled it.
        self.turn_deadline = 0.0

    def _dropped(self, count: int) -> None:
        self.host._waiting -= count

    # -- the run: up to TURNS_PER_RUN turns ---------------------------------------------

    async def run(self) -> None:
        """Run up to ``TURNS_PER_RUN`` waiting messages, one turn each, then yield the
        worker (requeued if more wait) so that busy agents do not starve the others.

        Asks and streams (envelopes) run through :meth:`_turn`. A tell (a bare message:
        nobody waits for it, the common case in a swarm) runs inline here, without the
        reply, deadline and abandonment bookkeeping an ask needs. Both share the state
        handling (``_persist``, ``_rollback``) and the Context. Not one turn coroutine for
        both: the two differ in every except clause (the watchdog's stop and a log line
        for a tell; the caller's timeout, its abandonment and an answer for an ask), and a
        coroutine per told turn alone cost the swarm ~1.3% more event-loop CPU
        (docs/runtime.md).
        """
        host = self.host
        observer = host._observer
        told_timeout = host._told_timeout
        spans = host.spans
        self.phase = RUNNING
        try:
            for _ in range(TURNS_PER_RUN):
                message = self.next_message
                if message is not NO_MESSAGE:
                    self.next_message = NO_MESSAGE
                else:
                    mailbox = self.mailbox
                    if not mailbox:
                        break
                    message = mailbox.popleft()
                host._waiting -= 1
                trace_context = None
                if type(message) is Envelope and message.reply is None:
                    # A tell traced with its sender's context (only while tracing is on).
                    trace_context = message.context
                    message = message.message
                elif type(message) is Envelope:
                    if self._expired(message) or (
                        self.state is None
                        and not self._start_fresh()
                        and not await self._load_before(message)
                    ):
                        continue  # the caller is gone, or the load failed: never run
                    if self.agent._replaced and not self._upgrade(message):
                        continue
                    message.started = True
                    await self._turn(message)
                    continue
                if (
                    self.state is None
                    and not self._start_fresh()
                    and not await self._load_for(message)
                ):
                    continue
                if self.agent._replaced and not self._upgrade(message):
                    continue
                # The told turn, inline.
                timed = False
                if observer is not None:
                    host._until_observed -= 1
                    if host._until_observed <= 0:
                        host._until_observed = host._observe_every
                        timed = True
                        started = _perf_counter()
                outcome = "ok"
                error: BaseException | None = None
                scope = None if spans is None else spans.turn(self.address, trace_context, "tell")
                try:
                    if told_timeout is None:
                        ctx = Context(self.address, self.state, None, host)  # type: ignore[arg-type]
                        await self.agent.handle(ctx, message)
                    else:
                        await self._told_turn(message, told_timeout)
                    if self.state or self.snapshot not in _EMPTY_SNAPSHOTS:
                        # (Skips the call when _persist would find nothing to do: an
                        # agent whose state stays empty, as the swarm's collector.)
                        self._persist(False)
                except asyncio.CancelledError:
                    self._rollback()
                    outcome = "cancelled"
                    raise
                except TurnStopped:
                    self._rollback()
                    outcome = "deadline"
                    log.warning(
                        "agent %s: a told turn ran past its deadline (%gs) and was stopped",
                        self.address,
                        told_timeout,
                    )
                except Exception as exc:
                    self._rollback()
                    outcome = "error"
                    error = exc
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
                    if scope is not None:  # after the observer: its exemplar is this trace
                        scope.close(outcome, _code_of(error))
        finally:
            self.last_turn = _monotonic()
            if self.next_message is not NO_MESSAGE or self.mailbox:
                self.phase = SCHEDULED
                host.pool.requeue(self)
            else:
                self.mailbox = None
                self.phase = IDLE

    def drop_if_expired(self) -> bool:
        """For the worker pool, on this activation's place in a full run queue: True (and
        IDLE again) when every message waiting is an ask nobody waits for."""
        self.drop_dead()
        if self.next_message is not NO_MESSAGE:
            return False
        self.mailbox = None
        self.phase = IDLE
        return True

    # -- turns ----------------------------------------------------------------------------

    async def _told_turn(self, message: Any, timeout: float) -> None:
        """Run a told turn that has the default deadline, counted from its start (nobody
        waits for it). The host's watchdog cancels it once the deadline has passed (see
        ``ActorHost._watch_told_turns``): that cancellation is taken back here and raised
        as TurnStopped; any other one (the pool shutting down) goes on up."""
        host = self.host
        deadline = host._loop_time() + timeout
        self.turn_deadline = deadline
        try:
            ctx = Context(self.address, self.state, deadline, host)  # type: ignore[arg-type]
            await self.agent.handle(ctx, message)
        except asyncio.CancelledError:
            if self.turn_deadline == STOPPED:
                self.turn_deadline = 0.0
                if asyncio.current_task().uncancel() == 0:  # type: ignore[union-attr]
                    raise TurnStopped from None
                # Another cancellation came with the stop: the worker's, so it goes on up.
            raise
        finally:
            if self.turn_deadline == STOPPED:
                # The agent caught the stop's CancelledError: take the request back, or it
                # would hit the worker's next turn.
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
            self.turn_deadline = 0.0

    async def _load_before(self, envelope: Envelope) -> bool:
        """Load the state before ``envelope``'s turn; True when the turn may still start
        (loaded, and its caller still waits)."""
        if envelope.deadline is not None and envelope.timer is None:
            # The load can take long (a slow store): the deadline must reach the caller
            # meanwhile.
            envelope.timer = asyncio.get_running_loop().call_at(
                envelope.deadline, self.host._expire, envelope, self.address
            )
        return await self._load_for(envelope) and not self._expired(envelope)

    async def _turn(self, envelope: Envelope) -> None:
        """An ask's or a stream's turn: answers the caller with the reply (once the state
        it caused is committed) or the error, within the envelope's deadline; the caller
        giving up cancels the turn (and only the turn)."""
        host = self.host
        started = _perf_counter()
        outcome = "error"
        reply, events = envelope.reply, envelope.events
        error: BaseException | None = None
        spans = host.spans
        scope = (
            None
            if spans is None
            else spans.turn(self.address, envelope.context, "ask" if events is None else "stream")
        )
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
            committed = self._persist(True)
            outcome = "ok"
            if committed is not None and spans is not None:
                self._trace_commit(spans, committed)
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
            fail(reply, DeadlineExceeded(f"agent {self.address} did not finish in time"))
        except asyncio.CancelledError:
            self._rollback()
            outcome = "cancelled"
            if watch is not None and watch.fired:
                watch.fired = False  # its cancellation request is taken back here
                if watch.task.uncancel() == 0:
                    return  # only the caller gave up: this turn ends, the worker goes on
                # Another cancellation landed with the abandonment (the pool shutting
                # down): it is the worker's, so it goes on up.
            fail(reply, Unavailable("the runtime is shutting down"))
            raise
        except AgentdError as exc:
            self._rollback()
            error = exc
            fail(reply, exc)
        except Exception as exc:
            self._rollback()
            error = exc
            log.exception("agent %s raised", self.address)
            fail(reply, Internal(f"agent {self.address} failed: {type(exc).__name__}: {exc}"))
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
                events.put_nowait(END)
            host._turn_finished(self.address.type, outcome, _perf_counter() - started)
            if scope is not None:  # after the observer: its exemplar is this trace
                scope.close(outcome, _code_of(error))

    def _trace_commit(self, spans: Spans, committed: asyncio.Future[None]) -> None:
        """A ``state.commit`` span (a child of the turn) from now until ``committed``."""
        store = self.host.store
        span = spans.commit(len(self.snapshot))
        if not span.is_recording():  # the request was not sampled: nothing to end
            return
        committed.add_done_callback(
            lambda future: spans.committed(span, future, getattr(store, "last_commit_size", None))
        )

    def _expired(self, envelope: Envelope) -> bool:
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

    def _upgrade(self, message: Any) -> bool:
        """Before a turn, when this instance's type was replaced (a plugin reload) or
        removed: move to the registry's current type, migrating the state if the type has
        ``migrate_state(state, previous_version)``. True when the turn may run on it; else
        ``message`` failed (NOT_FOUND: the type was removed; INTERNAL: the new version's
        constructor or migration raised, and the next turn tries again)."""
        address = self.address
        old_type = type(self.agent)
        error: AgentdError
        try:
            agent_type = self.host.registry.get(address.type)
            agent = agent_type()
            migrate = getattr(agent_type, "migrate_state", None)
            if migrate is not None and self.state is not None:
                state = migrate(self.state, getattr(old_type, "_plugin_version", None))
                if not isinstance(state, dict):
                    raise TypeError(f"migrate_state returned {type(state).__name__}, not a dict")
                self.state = state
                self._persist(False)  # so that a failing turn rolls back to the new shape
        except AgentdError as exc:
            self._rollback()
            error = exc
        except Exception as exc:
            self._rollback()
            log.exception("agent %s: its new version could not take over", address)
            error = Internal(
                f"agent {address}: its new version could not take over: {type(exc).__name__}: {exc}"
            )
        else:
            self.agent = agent
            return True
        if not fail_message(message, error):
            log.warning("a message to %s was dropped: %s", address, error.message)
        return False

    # -- state ----------------------------------------------------------------------------

    def _persist(self, waited: bool) -> asyncio.Future[None] | None:
        """After a turn: queue the state for commit if the turn changed it. ``waited``: a
        caller waits for the turn (an ask), so the commit's future comes back for it to
        hear once the state is durable; else (a tell) None.

        A turn whose state a failed commit dropped while it ran (``state`` is None) is not
        applied: UNAVAILABLE for an ask; a tell is dropped, as the store's failure log
        says.
        """
        state = self.state
        if not state:
            if state is None:
                if waited:
                    raise Unavailable(
                        f"agent {self.address}: an earlier change to its state could not "
                        "be saved; this turn was not applied, try again"
                    )
                return None
            if self.snapshot in _EMPTY_SNAPSHOTS:
                return None  # still empty: nothing to serialise or store
        try:
            snapshot = _dumps(state)
        except TypeError as exc:
            raise Internal(f"agent {self.address} state is not JSON-serialisable: {exc}") from None
        if snapshot == self.snapshot:
            return None
        # orjson's result sits in a ~4 KiB buffer: keep an exact-size copy.
        self.snapshot = snapshot = memoryview(snapshot).tobytes()
        address = self.address
        key = address.type + "/" + address.id  # str(address), without a call into Python
        if waited:
            return self.host.store.save(key, snapshot)
        self.host.store.save_nowait(key, snapshot)
        return None

    def _rollback(self) -> None:
        # A failed turn leaves the state of the last good turn (None stays None: a failed
        # commit dropped the state, to be read again from the store).
        if self.state is not None:
            self.state = orjson.loads(self.snapshot) if self.snapshot else {}

    def drop_state(self) -> None:
        """Forget the in-memory state (a commit of it failed): the next turn reads the
        last committed snapshot from the store, and a running turn will not save."""
        self.state = None
        self.snapshot = b""
        # The store may hold a row for this agent even if it started empty.
        self.host._stored_since_open.add(self.address)

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

    async def _load_for(self, message: Any) -> bool:
        """Load the state before ``message``'s turn; False (the message failed with
        UNAVAILABLE, or logged for a tell) when the store cannot read it."""
        address = self.address
        try:
            snapshot = await self.host.store.load(address.type + "/" + address.id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = Unavailable(f"agent {address}: its state could not be read: {exc}")
            if not fail_message(message, error):
                log.error("a message to %s was dropped: %s", address, error.message)
            return False
        self.snapshot = snapshot or b""
        self.state = orjson.loads(snapshot) if snapshot else {}
        return True


class _CancelTurnWhenAbandoned:
    """The reply's done-callback: a caller that cancelled its reply cancels the turn."""

    __slots__ = ("fired", "task", "turn_over")

    def __init__(self, task: asyncio.Task) -> None:
        self.task = task
        self.fired = False
        self.turn_over = False

    def __call__(self, reply: asyncio.Future) -> None:
        if reply.cancelled() and not self.turn_over:
            self.fired = True
            self.task.cancel()


def _code_of(error: BaseException | None) -> str | None:
    """A failed turn's error code for its span: the agentd error's, else INTERNAL."""
    if error is None:
        return None
    return error.code.name if isinstance(error, AgentdError) else "INTERNAL"


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
