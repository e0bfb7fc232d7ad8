"""Agent types that ship with agentd."""

from agentd.agents.builtin.chat import Chat
from agentd.agents.builtin.echo import Echo

BUILTIN_AGENTS = (Chat, Echo)

__all__ = ["BUILTIN_AGENTS", "Chat", "Echo"]
