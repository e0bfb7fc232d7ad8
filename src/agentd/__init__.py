"""agentd: a runtime and gateway for AI agents at high concurrency."""

from agentd.agents import Address, Agent, Context, Message
from agentd.errors import AgentdError, Code

__version__ = "0.1.0"

__all__ = ["Address", "Agent", "AgentdError", "Code", "Context", "Message", "__version__"]
