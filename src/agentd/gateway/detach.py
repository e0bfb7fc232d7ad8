"""ASGI ``receive``/``send`` futures the app may give up on without touching the server's.

pyvoy completes every receive and send future it hands out, even one the app stopped
waiting for, and logs InvalidStateError when the app had cancelled it. Disconnect watchers
do that to a pending receive when the response finishes first (ours for OpenAI requests,
connect-python's for streaming RPCs), and a stream cut off by a leaving client does it to
a pending send. :func:`detach` gives the app a future of its own that follows the
server's, so cancelling it leaves the server's alone.

The entry point detaches every receive (free: a body is usually there already, and one
receive per request at most waits). Sends are detached only where a sender may be cut off
(the OpenAI event streams): each send of a reply waits for the server, and the extra hop
per send cost the gRPC benchmark ~20% of its requests/s.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["detach"]


def detach(call: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """``call`` (an ASGI receive or send) returning futures that follow the server's."""

    def detached(*args: Any) -> Awaitable[Any]:
        inner = call(*args)
        if not isinstance(inner, asyncio.Future):
            return asyncio.shield(inner)
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
