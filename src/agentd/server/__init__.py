"""Server: runs the gateway under Envoy and supervises it."""

from agentd.errors import ConfigError, StartupError
from agentd.server.envoy import EnvoyProcess, Listening
from agentd.server.preflight import preflight

__all__ = ["ConfigError", "EnvoyProcess", "Listening", "StartupError", "preflight"]
