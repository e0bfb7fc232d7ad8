"""Helpers for testing agentd and agents written for it: run a real server in a subprocess."""

from agentd.testing.agents import FakeHost, Turn, run_turn
from agentd.testing.asgi import AsgiLifespan, AsgiResponse, asgi_request
from agentd.testing.server import RunningServer, start_server

__all__ = [
    "AsgiLifespan",
    "AsgiResponse",
    "FakeHost",
    "RunningServer",
    "Turn",
    "asgi_request",
    "run_turn",
    "start_server",
]
