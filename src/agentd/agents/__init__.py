"""Agents: the programming model, addresses and the type registry."""

from agentd.agents.address import DEFAULT_ID, Address, parse_address
from agentd.agents.base import Agent, Reply
from agentd.agents.context import Context
from agentd.agents.host import AgentHost
from agentd.agents.message import Message
from agentd.agents.registry import AgentRegistry

__all__ = [
    "DEFAULT_ID",
    "Address",
    "Agent",
    "AgentHost",
    "AgentRegistry",
    "Context",
    "Message",
    "Reply",
    "parse_address",
]
