"""``ctx.tool`` from an agent turn, through the runtime."""

from __future__ import annotations

import pytest

from agentd import Agent, Message
from agentd.agents import AgentRegistry
from agentd.errors import DeadlineExceeded, Unavailable
from agentd.runtime import ActorHost, MemoryStateStore, Runtime, WorkerPool
from agentd.tools import ToolError, ToolLimits
from agentd.tools.components import open_components
from agentd.tools.service import ToolService
from tests.tools.support import LIMITS


class Calculator(Agent):
    name = "calculator"

    async def handle(self, ctx, message):
        try:
            value = await ctx.tool("calc", {"expression": message.text})
        except ToolError as exc:
            return f"error: {exc.message}"
        ctx.state["last"] = value
        return str(value)


class Looper(Agent):
    name = "looper"

    async def handle(self, ctx, message):
        return str(await ctx.tool("loop_forever"))


def runtime_with(tools: ToolService | None) -> Runtime:
    registry = AgentRegistry()
    registry.register(Calculator)
    registry.register(Looper)
    return Runtime(ActorHost(registry, MemoryStateStore(), pool=WorkerPool(4, 64), tools=tools))


async def test_agent_calls_a_tool(artefact):
    tools = ToolService(
        artefact.tools,
        lambda: open_components(artefact, LIMITS),
        limits=LIMITS,
    )
    await tools.start()
    runtime = runtime_with(tools)
    await runtime.start()
    try:
        _, reply = await runtime.invoke("calculator/a", Message("6 * 7"))
        assert reply.text == "42"
        _, reply = await runtime.invoke("calculator/a", Message("1 / 0"))
        assert reply.text == "error: tool 'calc' raised ZeroDivisionError: division by zero"
    finally:
        await runtime.aclose()
        await tools.aclose()


async def test_turn_deadline_bounds_the_tool_call(artefact):
    limits = ToolLimits(max_fuel=10**15, timeout_s=5.0)
    tools = ToolService(artefact.tools, lambda: open_components(artefact, limits), limits=limits)
    await tools.start()
    runtime = runtime_with(tools)
    await runtime.start()
    try:
        with pytest.raises(DeadlineExceeded):
            await runtime.invoke("looper", Message(""), timeout=0.3)
    finally:
        await runtime.aclose()
        await tools.aclose()


async def test_ctx_tool_without_a_tool_service():
    runtime = runtime_with(None)
    await runtime.start()
    try:
        with pytest.raises(Unavailable, match="this runtime has no tool service"):
            await runtime.invoke("calculator", Message("1"))
    finally:
        await runtime.aclose()
