"""The ASGI types of the gateway, defined once, and the keys it adds to a request's scope.

The gateway matches a request's path once (:mod:`agentd.gateway.router`) and keeps the
match in the scope, so every layer after it (observe, auth, body limit, the endpoint) reads
it instead of matching again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["PROTOCOL", "ROUTE", "ASGIApp", "Message", "Receive", "Scope", "Send"]

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Scope keys the gateway sets on each HTTP request before its middleware runs.
ROUTE = "agentd.route"  # the matched agentd.gateway.router.Route
PROTOCOL = "agentd.protocol"  # the agentd.gateway.protocol.Protocol the request speaks
