"""Helpers for testing agentd and agents written for it: run a real server in a subprocess."""

from agentd.testing.server import RunningServer, start_server

__all__ = ["RunningServer", "start_server"]
