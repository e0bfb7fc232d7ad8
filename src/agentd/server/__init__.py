"""Server: runs the gateway under Envoy and supervises it."""

from agentd.server.envoy import EnvoyProcess, Listening, StartupError

__all__ = ["EnvoyProcess", "Listening", "StartupError"]
