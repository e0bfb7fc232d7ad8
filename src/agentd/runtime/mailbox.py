"""The messages waiting for one agent: bare tells and enveloped asks, in arrival order.

A tell waits as the bare message (nobody waits for its turn: no reply, no deadline, no
allocation). An ask or a stream waits in an :class:`Envelope`, which carries its reply
future, its deadline and, for a stream, its event queue. The first waiting message sits in
a slot of the :class:`Mailbox` (most agents get one message at a time), more in a deque
allocated only while two or more wait (a deque costs ~0.7 µs and a 600-byte block to make).

A waiting ask whose caller gave up or whose deadline passed is dead: a full mailbox drops
its dead asks before it refuses a message, and the run queue drops an agent whose waiting
messages are all dead.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from agentd.agents.address import Address
from agentd.errors import ResourceExhausted

__all__ = ["END", "NO_MESSAGE", "Envelope", "Mailbox", "fail", "fail_message"]

END = object()  # closes a turn's event stream
NO_MESSAGE = object()  # a mailbox's slot when no message waits


class Envelope:
    """An ask or a stream on its way to a turn: the message and who waits for it."""

    __slots__ = ("context", "deadline", "events", "message", "reply", "started", "timer")

    def __init__(
        self,
        message: Any,
        reply: asyncio.Future | None,
        deadline: float | None,
        events: asyncio.Queue | None,
    ) -> None:
        self.message = message
        self.reply = reply
        self.deadline = deadline  # on the loop's clock, or None
        self.events = events  # a stream's events, ended by END; None for an ask
        # Set when its turn begins: from then on the turn's own timeout answers the
        # deadline (and a turn that finished waits for its commit, not for the clock).
        self.started = False
        # Answers the caller at the deadline while the call waits (see ActorHost.ask);
        # cancelled by the caller once it has its answer.
        self.timer: asyncio.TimerHandle | None = None
        # The sender's trace context (tracing on): its turn runs as a child of the sender's
        # span. A tell travels in an envelope too when tracing is on (``reply`` None).
        self.context: object = None

    def dead(self) -> bool:
        """Nobody waits for it any more (its caller gave up or its deadline passed)."""
        return self.reply is not None and self.reply.done()


def fail(reply: asyncio.Future | None, error: BaseException) -> None:
    """Answer ``reply`` with ``error`` unless it is answered already."""
    if reply is not None and not reply.done():
        reply.set_exception(error)


def fail_message(message: Any, error: BaseException) -> bool:
    """Answer a waiting ask or stream (an :class:`Envelope`) with ``error`` and end its
    events; False for a told message (bare, or in an envelope for its trace context), which
    has nobody to answer."""
    if type(message) is not Envelope or (message.reply is None and message.events is None):
        return False
    fail(message.reply, error)
    if message.events is not None:
        message.events.put_nowait(END)
    return True


class Mailbox:
    """The waiting messages of the agent at ``address``: ``next_message`` (the slot, or
    NO_MESSAGE), then ``mailbox`` (a deque, or None while at most one waits).

    A base class (with slots) rather than an object of its own: a million activations
    would each pay for a second object and a pointer to it.
    """

    __slots__ = ("address", "mailbox", "next_message")

    def __init__(self, address: Address) -> None:
        self.address = address
        self.next_message: Any = NO_MESSAGE
        self.mailbox: deque[Any] | None = None

    def _dropped(self, count: int) -> None:
        """Told how many dead asks ``drop_dead`` just dropped (for the owner's counts)."""

    def waiting(self) -> int:
        """Messages waiting."""
        queued = len(self.mailbox) if self.mailbox is not None else 0
        return queued + (self.next_message is not NO_MESSAGE)

    def push(self, message: Any, limit: int) -> None:
        """Queue ``message`` after those waiting; ResourceExhausted at ``limit`` waiting
        (after dropping the asks that expired while they waited)."""
        mailbox = self.mailbox
        if mailbox is None:
            if self.next_message is NO_MESSAGE:
                self.next_message = message
                return
            if limit > 1:
                mailbox = self.mailbox = deque()
        if mailbox is None or len(mailbox) + (self.next_message is not NO_MESSAGE) >= limit:
            if not self.drop_dead():
                raise ResourceExhausted(f"agent {self.address} has {limit} messages waiting")
            if self.next_message is NO_MESSAGE:
                self.next_message = message
                return
            mailbox = self.mailbox
            assert mailbox is not None
        mailbox.append(message)

    def unpush(self) -> None:
        """Take back the message ``push`` just queued."""
        if self.mailbox:
            self.mailbox.pop()
        else:
            self.next_message = NO_MESSAGE

    def drop_dead(self) -> int:
        """Drop the waiting asks nobody waits for any more (expired or abandoned), keeping
        the order of the others; returns how many were dropped."""
        mailbox = self.mailbox
        waiting = list(mailbox) if mailbox else []
        if self.next_message is not NO_MESSAGE:
            waiting.insert(0, self.next_message)
        live = [m for m in waiting if type(m) is not Envelope or not m.dead()]
        dropped = len(waiting) - len(live)
        if not dropped:
            return 0
        self.next_message = live.pop(0) if live else NO_MESSAGE
        if mailbox is not None:
            mailbox.clear()
            mailbox.extend(live)
        self._dropped(dropped)
        return dropped
