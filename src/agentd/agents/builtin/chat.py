"""The ``chat`` agent: talks through the built-in language model and remembers the talk.

Each instance (``chat/alice``, ``chat/bob``) keeps its own conversation in ``ctx.state``,
so it survives passivation and restarts. InvokeStream streams the reply token by token.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from agentd.agents.base import Agent, Context, Reply
from agentd.agents.message import Message

# Turns of history sent with each prompt (the tiny model's context is short).
_HISTORY_TURNS = 6


class Chat(Agent):
    name = "chat"
    description = "Chats through the built-in language model; each instance remembers its talk."

    async def handle(self, ctx: Context, message: Message) -> Reply:
        return "".join([piece async for piece in self.stream(ctx, message)])

    async def stream(self, ctx: Context, message: Message) -> AsyncIterator[str]:
        text = message.text if isinstance(message, Message) else str(message)
        history: list[list[str]] = ctx.state.get("history", [])
        messages = [{"role": role, "content": content} for role, content in history]
        messages.append({"role": "user", "content": text})
        model = message.metadata.get("model") if isinstance(message, Message) else None
        reply: list[str] = []
        async for piece in ctx.generate(messages, model=model or None, max_tokens=64):
            reply.append(piece)
            yield piece
        turns = [*history, ["user", text], ["assistant", "".join(reply)]]
        ctx.state["history"] = turns[-2 * _HISTORY_TURNS :]
