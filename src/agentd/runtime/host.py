"""The actor host: the directory of one node's activations, delivery, passivation and the
told-turn watchdog.

Every address ``type/id`` has at most one activation (``activation.py``), made on its
first message and dropped (passivated) after ``idle_seconds`` without one. Delivery puts a
message in the activation's mailbox (``mailbox.py``) and, when the agent is idle, the
activation on the worker pool's bounded run queue (``pool.py``); a full queue is "no room"
(``tell_nowait`` returns False) or RESOURCE_EXHAUSTED (``ask``). The host applies the
node's deadline rule (``agentd.deadlines``) to asks, streams and tells, and stops told
turns past the default deadline with one watchdog task. State lives in a
:class:`~agentd.runtime.state.StateStore`.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import time
from collections import defaultdict
from collections.abc import AsyncGenerator, Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from agentd.agents.address import Address, parse_address
from agentd.agents.base import Agent
from agentd.agents.registry import AgentRegistry
from agentd.deadlines import DeadlinePolicy
from agentd.errors import AgentdError, DeadlineExceeded, ResourceExhausted, Unavailable
from agentd.runtime.activation import IDLE, PASSIVATED, SCHEDULED, STOPPED, Activation
from agentd.runtime.mailbox import END, NO_MESSAGE, Envelope, fail, fail_message
from agentd.runtime.pool import WorkerPool
from agentd.runtime.state import StateStore

if TYPE_CHECKING:
    from agentd.agents.host import AgentHost
    from agentd.generate.service import GenerationService
    from agentd.observability.spans import Spans
    from agentd.tools.service import ToolService

__all__ = ["ActorHost", "Forwarder", "Inference", "TurnObserver"]


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


class Forwarder(Protocol):
    """Where a host sends messages for agents its node does not own (``agentd.cluster``
    implements it: placement, then one hop to the owner over a peer connection).

    The host asks ``owns`` only when an address has no activation here (activations exist
    only for owned agents: a partition handed away is released first), so agents already
    active pay nothing. ``timeout`` is already resolved by the node's deadline rule (None:
    no limit); the owner's reply, or its error (the same agentd error class), is returned.
    """

    def owns(self, address: Address) -> bool: ...

    def tell_nowait(self, address: Address, message: Any, context: object = None) -> bool:
        """Queue a tell for the owner (batched with others); False when the peer's
        buffer is full (then ``wait_for_room``). Raises Unavailable without a peer.
        ``context``: the sender's trace context (tracing on), for the owner's turn."""
        ...

    async def wait_for_room(self, address: Address) -> None: ...

    async def ask(self, address: Address, message: Any, timeout: float | None) -> Any: ...

    def ask_stream(
        self, address: Address, message: Any, timeout: float | None
    ) -> AsyncGenerator[Any, None]: ...


def _running_loop_time() -> float:
    return asyncio.get_running_loop().time()


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
        forwarder: Forwarder | None = None,
        spans: Spans | None = None,
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
        self._activations: dict[Address, Activation] = {}
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
        # Agents this node does not own go to their owner (None: it owns every agent).
        self.forwarder = forwarder
        # Tracing on: each turn is a span, a child of its sender's (the context travels in
        # the message's envelope). None: one check per turn and per message, no more.
        self.spans = spans
        store.on_commit_failed = self._commit_failed
        # Stores that remember something per agent (Redis: the version it read) are told
        # when an agent is passivated.
        self._forget: Callable[[str], None] | None = getattr(store, "forget", None)

    async def start(self) -> None:
        await self.store.open()
        if self.forwarder is not None:
            # Other nodes write this store too: an agent that moves here may have a state
            # although this node never stored one, so every new activation loads.
            self.store.empty_at_open = False
        self.pool.start()
        loop = asyncio.get_running_loop()
        self._loop_time = loop.time
        self._sweeper = loop.create_task(self._sweep_forever(), name="passivation")
        if self._told_timeout is not None:
            self._watchdog = loop.create_task(
                self._watch_told_turns(self._told_timeout), name="told-turn-deadlines"
            )

    def reconfigure(
        self, *, idle_seconds: float | None = None, max_mailbox: int | None = None
    ) -> None:
        """Apply changed limits live (a settings reload): the idle time before passivation,
        the mailbox bound (for messages from now on), and the told turns' deadline from the
        node's deadline policy (updated in place before this call)."""
        if idle_seconds is not None:
            self._idle_seconds = idle_seconds
        if max_mailbox is not None:
            self._max_mailbox = max_mailbox
        told = self._deadlines.default_s
        if told == self._told_timeout:
            return
        self._told_timeout = told  # turns from now on; running ones keep theirs
        if self._sweeper is None:
            return  # not started: start() sets the watchdog up
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if told is not None:
            self._watchdog = asyncio.get_running_loop().create_task(
                self._watch_told_turns(told), name="told-turn-deadlines"
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
        remote = self._forwarded(address)
        wait_for_room = (
            self.pool.wait_for_room
            if remote is None or self.forwarder is None
            else functools.partial(self.forwarder.wait_for_room, remote)
        )
        timeout = self._deadlines.timeout(timeout)
        if timeout is None:  # no limit configured: no timer (a swarm's burst of tells)
            while not self.tell_nowait(address, message):
                await wait_for_room()
            return
        try:
            async with asyncio.timeout(timeout):
                while not self.tell_nowait(address, message):
                    await wait_for_room()
        except TimeoutError:
            raise DeadlineExceeded(
                f"the run queue had no room for a message to {address} within {timeout:g}s"
            ) from None

    def tell_nowait(self, address: str | Address, message: Any) -> bool:
        """Deliver without waiting; False (nothing delivered) when the agent would need a
        place on a full run queue. Raises for unknown or malformed addresses and a full
        mailbox."""
        activation = self._activations.get(address)  # type: ignore[arg-type]  # a str misses: parsed after
        if activation is None:
            if self.forwarder is not None and (remote := self._forwarded(address)) is not None:
                if self.spans is not None:  # the owner's turn: a child of the sender's span
                    return self.forwarder.tell_nowait(remote, message, self.spans.current())
                return self.forwarder.tell_nowait(remote, message)
            activation = self._activation_missed(address)
        if self.spans is not None:
            # The sender's trace context travels with the tell (its turn, a child span).
            envelope = Envelope(message, None, None, None)
            envelope.context = self.spans.current()
            message = envelope
        if activation.phase is not IDLE:
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
        activation.phase = SCHEDULED
        return True

    async def ask(
        self, address: str | Address, message: Any, *, timeout: float | None = None
    ) -> Any:
        """Deliver and await the reply. Raises ResourceExhausted when the run queue is
        full, DeadlineExceeded past ``timeout`` (else the host's default deadline; the turn
        is cancelled), or the turn's error."""
        if self.forwarder is not None and (remote := self._forwarded(address)) is not None:
            return await self.forwarder.ask(remote, message, self._deadlines.timeout(timeout))
        envelope = self._post(address, message, timeout, None)
        reply = envelope.reply
        assert reply is not None
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
    ) -> AsyncGenerator[Any, None]:
        """Run a streaming turn and yield its events, within ``timeout`` (else the host's
        default deadline)."""
        if self.forwarder is not None and (remote := self._forwarded(address)) is not None:
            stream = self.forwarder.ask_stream(remote, message, self._deadlines.timeout(timeout))
            try:
                async for event in stream:
                    yield event
            finally:
                await stream.aclose()
            return
        events: asyncio.Queue[Any] = asyncio.Queue(maxsize=64)
        envelope = self._post(address, message, timeout, events)
        reply = envelope.reply
        assert reply is not None
        try:
            while True:
                get = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({get, reply}, return_when=asyncio.FIRST_COMPLETED)
                if get in done:
                    event = get.result()
                    if event is END:
                        break
                    yield event
                else:
                    get.cancel()
                    if reply.exception() is not None:
                        raise reply.exception()  # type: ignore[misc]
                    # Finished: drain what is left.
                    while (event := events.get_nowait()) is not END:
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

    def _post(
        self,
        address: str | Address,
        message: Any,
        timeout: float | None,
        events: asyncio.Queue[Any] | None,
    ) -> Envelope:
        """Deliver an ask (``events`` None) or a stream in an envelope, with its deadline
        (the caller's ``timeout``, else the default). Raises as ``tell_nowait`` does, and
        ResourceExhausted where a tell would wait for room."""
        loop = asyncio.get_running_loop()
        timeout = self._deadlines.timeout(timeout)
        deadline = None if timeout is None else loop.time() + timeout
        activation = self._activation(address)
        envelope = Envelope(message, loop.create_future(), deadline, events)
        if self.spans is not None:
            envelope.context = self.spans.current()  # the turn: a child of the caller's span
        if not self._deliver_nowait(activation, envelope) and deadline is not None:
            # It waits (run queue, mailbox): the deadline must reach it there, so that the
            # caller hears at its deadline, not when a worker frees up. A call a worker
            # takes at once needs no timer: its turn's own timeout covers it.
            envelope.timer = loop.call_at(deadline, self._expire, envelope, activation.address)
        return envelope

    def _expire(self, envelope: Envelope, address: Address) -> None:
        """``envelope``'s deadline passed: if its turn has not started, answer the caller
        now (the turn will never start) and let the run queue drop the dead place."""
        if envelope.started or envelope.dead():
            return
        fail(
            envelope.reply,
            DeadlineExceeded(f"agent {address}: the deadline passed before the call could run"),
        )
        self.pool.mark_stale()

    def _deliver_nowait(self, activation: Activation, envelope: Any) -> bool:
        """Enqueue, scheduling the agent if idle; undone and re-raised when the run queue
        refuses it (full or closing). True when a worker takes it at once (the agent was
        idle and a worker was waiting), False when it waits."""
        activation.push(envelope, self._max_mailbox)
        self._waiting += 1
        if activation.phase is not IDLE:
            return False  # behind the agent's running turn or its place on the run queue
        try:
            at_once = self.pool.submit_nowait(activation)
        except AgentdError:
            activation.unpush()
            self._waiting -= 1
            raise
        activation.phase = SCHEDULED
        return at_once

    def _forwarded(self, address: str | Address) -> Address | None:
        """``address`` parsed when another node owns it (and it has no activation here),
        else None. Raises InvalidArgument for a malformed address."""
        forwarder = self.forwarder
        if forwarder is None or address in self._activations:
            return None
        addr = parse_address(address) if isinstance(address, str) else address
        if addr in self._activations or forwarder.owns(addr):
            return None
        if self.registry.get(addr.type).stateless:  # runs where the call arrives
            return None
        return addr

    async def release(self, keep: Callable[[Address], bool], *, timeout: float = 10.0) -> int:
        """Hand agents away: passivate every activation ``keep`` refuses once its queued
        turns have run, then commit the store, so that the new owner reads their last
        state. Activations still busy after ``timeout`` are dropped (their queued
        messages fail with UNAVAILABLE). Returns how many were released."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        released = 0
        while True:
            leaving = [a for a in self._activations if not keep(a)]
            if not leaving:
                break
            settled = [
                a
                for a in leaving
                if self._activations[a].phase is IDLE and not self._activations[a].waiting()
            ]
            for addr in settled:
                self._drop(addr)
            released += len(settled)
            if len(settled) == len(leaving):
                break
            if loop.time() >= deadline:
                for addr in leaving:
                    if addr in self._activations:
                        _fail_waiting(
                            self._activations[addr],
                            Unavailable(f"agent {addr} moved to another node; retry"),
                        )
                        self._drop(addr)
                        released += 1
                break
            await asyncio.sleep(0.005)
        await self.store.flush()
        return released

    def release_nowait(self, keep: Callable[[Address], bool], error: AgentdError) -> int:
        """Drop every activation ``keep`` refuses at once (no waiting, no flush): the
        callers waiting in their mailboxes get ``error``. For a node that may no longer own
        its agents (its cluster lease lapsed): nothing queued may run as their owner."""
        leaving = [a for a in self._activations if not keep(a)]
        for addr in leaving:
            _fail_waiting(self._activations[addr], error)
            self._drop(addr)
        return len(leaving)

    def _drop(self, addr: Address) -> None:
        activation = self._activations.pop(addr)
        activation.phase = PASSIVATED
        self._active_by_type[addr.type] -= 1
        self._passivated += 1
        if activation.snapshot:
            self._stored_since_open.add(addr)
        if self._forget is not None:
            self._forget(addr.type + "/" + addr.id)

    def _activation(self, address: str | Address) -> Activation:
        """The activation for ``address``, made on first use."""
        activation = self._activations.get(address)  # type: ignore[arg-type]  # a str misses: parsed after
        if activation is None:
            activation = self._activation_missed(address)
        return activation

    def _activation_missed(self, address: str | Address) -> Activation:
        """After ``address`` missed in the activations: a string is parsed (raising
        InvalidArgument) and looked up as an Address; an Address has none, so make one.
        The senders' hot paths look up first themselves and call this only on a miss."""
        if isinstance(address, str):
            address = parse_address(address)
            activation = self._activations.get(address)
            if activation is not None:
                return activation
        return self._activate(address)

    def _activate(self, addr: Address) -> Activation:
        """A new activation for ``addr`` (which has none)."""
        agent_type = self.registry.get(addr.type)
        activations = self._activations
        if len(activations) >= self._max_active and not self.passivate_idle(0):
            raise ResourceExhausted(f"{self._max_active} agents are active (the limit)")
        activation = activations[addr] = Activation(addr, agent_type(), self)
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

    async def embed(self, model: str, texts: Sequence[str]) -> np.ndarray:
        """Vectors of ``texts`` from embedding model ``model`` (for ctx.embed)."""
        embeddings = getattr(self.inference, "embeddings", None)
        if embeddings is None:
            raise Unavailable("this runtime has no embedding models")
        return (await embeddings.embed(model, texts)).vectors

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
            if act.phase is IDLE and not act.waiting() and act.last_turn <= cutoff
        ]
        forget = self._forget
        for addr in idle:
            activation = self._activations.pop(addr)
            activation.phase = PASSIVATED
            self._active_by_type[addr.type] -= 1
            if activation.snapshot:
                self._stored_since_open.add(addr)
            if forget is not None:
                forget(addr.type + "/" + addr.id)
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
                    job.turn_deadline = STOPPED  # type: ignore[attr-defined]
                    task.cancel()

    async def _sweep_forever(self) -> None:
        while True:
            # Each time: a settings reload may change the idle time.
            await asyncio.sleep(max(1.0, min(60.0, self._idle_seconds / 4)))
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


def _fail_waiting(activation: Activation, error: AgentdError) -> None:
    """Answer the callers waiting in ``activation``'s mailbox with ``error`` and empty it
    (tells in it are dropped)."""
    waiting = list(activation.mailbox or ())
    if activation.next_message is not NO_MESSAGE:
        waiting.insert(0, activation.next_message)
    activation.next_message = NO_MESSAGE
    if activation.mailbox is not None:
        activation.mailbox.clear()
    for message in waiting:
        fail_message(message, error)


if TYPE_CHECKING:

    def _serves_agents(host: ActorHost) -> AgentHost:
        return host  # the type checker proves that ActorHost is an AgentHost
