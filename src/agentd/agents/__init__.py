"""Agents: the programming model, addresses and the type registry."""

from agentd.agents.address import DEFAULT_ID, Address, parse_address
from agentd.agents.base import Agent, Context, Reply
from agentd.agents.message import Message
from agentd.agents.registry import AgentRegistry

__all__ = [
    "DEFAULT_ID",
    "Address",
    "Agent",
    "AgentRegistry",
    "Context",
    "Message",
    "Reply",
    "parse_address",
]
