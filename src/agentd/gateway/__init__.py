"""Gateway: every protocol on one port, converted to runtime calls."""

from agentd.gateway.app import Gateway

__all__ = ["Gateway"]
