"""Server: runs the gateway under Envoy and supervises it."""

from agentd.server.envoy import ConfigError, EnvoyProcess, Listening, StartupError
from agentd.server.preflight import preflight

__all__ = ["ConfigError", "EnvoyProcess", "Listening", "StartupError", "preflight"]
