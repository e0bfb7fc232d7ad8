"""The ``echo`` agent: replies with what it got, or streams it back word by word."""

from __future__ import annotations

from collections.abc import AsyncIterator

from agentd.agents.base import Agent, Context, Reply
from agentd.agents.message import Message


class Echo(Agent):
    name = "echo"
    description = "Replies with the message it receives; streams it back word by word."
    stateless = True  # any node answers it: no forwarding in a cluster

    async def handle(self, ctx: Context, message: Message) -> Reply:
        return message

    async def stream(self, ctx: Context, message: Message) -> AsyncIterator[Reply]:
        words = message.text.split(" ")
        for i, word in enumerate(words):
            yield word if i == len(words) - 1 else word + " "
