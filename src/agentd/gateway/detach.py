"""A client that leaves: ASGI futures the app may give up on, and the error a send to a
gone client raises.

pyvoy completes every receive and send future it hands out, even one the app stopped
waiting for, and logs InvalidStateError when the app had cancelled it. Disconnect watchers
do that to a pending receive when the response finishes first (ours for OpenAI requests,
connect-python's for streaming RPCs). :func:`detach` gives the app a future of its own that
follows the server's, so cancelling it leaves the server's alone. The entry point detaches
every receive (free: a body is usually there already, and one receive per request at most
waits). Sends are never cancelled by our code (the OpenAI streams stop generation only
between sends), so they need no detaching, which would cost a hop per send.

pyvoy fails a send to a client that left with one shared ``ClientDisconnectedError``
object. Every raise prepends the raising frames to that object's ``__traceback__``, so it
kept the frames (and their locals) of every stream ever cut, and each log of it printed
them all. :func:`client_gone` wipes that history and gives the app a fresh
:class:`ClientGone` per request instead; the entry point ends a request that raises it
with a debug line.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["ClientGone", "client_gone", "detach"]


class ClientGone(ConnectionError):
    """The client left: what is still to be sent has nowhere to go. A normal event."""


def client_gone(error: BaseException) -> ClientGone:
    """A fresh :class:`ClientGone` for the server's (possibly shared) ``error``, whose
    traceback and chained errors are cleared so that it holds no request's frames."""
    error.__traceback__ = None
    error.__context__ = None
    error.__cause__ = None
    return ClientGone("the client disconnected")


def detach(call: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """``call`` (an ASGI receive) returning futures that follow the server's."""

    def detached(*args: Any) -> Awaitable[Any]:
        inner = call(*args)
        if not isinstance(inner, asyncio.Future):
            # A coroutine (a bridged or test receive): a task of its own, whose outcome
            # _follow always reads, so giving up on it logs nothing.
            inner = asyncio.ensure_future(inner)
        if inner.done():
            return inner  # nothing left to cancel
        outer = inner.get_loop().create_future()
        inner.add_done_callback(functools.partial(_follow, outer))
        return outer

    return detached


def _follow(outer: asyncio.Future[Any], inner: asyncio.Future[Any]) -> None:
    if inner.cancelled():
        if not outer.done():
            outer.cancel()
        return
    error = inner.exception()  # read even when the app gave up: no "never retrieved" log
    if outer.done():
        return
    if error is not None:
        outer.set_exception(error)
    else:
        outer.set_result(inner.result())
