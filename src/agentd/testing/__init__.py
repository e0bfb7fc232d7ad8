"""Helpers for testing agentd and agents written for it: run a real server in a subprocess."""

from agentd.testing.agents import FakeHost, Turn, run_turn
from agentd.testing.server import RunningServer, start_server

__all__ = ["FakeHost", "RunningServer", "Turn", "run_turn", "start_server"]
