"""Agent types that ship with agentd."""

from agentd.agents.builtin.echo import Echo

BUILTIN_AGENTS = (Echo,)

__all__ = ["BUILTIN_AGENTS", "Echo"]
