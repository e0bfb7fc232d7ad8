"""Agent types the integration tests load through --plugins."""

import asyncio

from agentd import Agent


class Slow(Agent):
    name = "slow"
    description = "Sleeps for the number of seconds in the message text, then answers."

    async def handle(self, ctx, message):
        await asyncio.sleep(float(message.text or "1"))
        return "done"


class Boom(Agent):
    name = "boom"
    description = "Always raises."

    async def handle(self, ctx, message):
        raise ValueError("kaboom")


class Counter(Agent):
    name = "counter"
    description = "Counts the messages this instance has seen."

    async def handle(self, ctx, message):
        seen = ctx.state.get("seen", 0) + 1
        # Yield to the loop mid-turn: turns of one instance must still not interleave.
        await asyncio.sleep(0)
        ctx.state["seen"] = seen
        return str(seen)


class Ticker(Agent):
    name = "ticker"
    description = "Streams N ticks (N from the message text), one every 50 ms."

    async def handle(self, ctx, message):
        return "use InvokeStream"

    async def stream(self, ctx, message):
        for i in range(int(message.text or "3")):
            await asyncio.sleep(0.05)
            yield f"tick {i}"
