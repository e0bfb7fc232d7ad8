"""An agent unit-tested without a runtime: agentd.testing's FakeHost and run_turn, and the
Context they drive (the same Context the runtime gives a turn)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np
import pytest

from agentd import Agent, Message
from agentd.agents import Address, Context
from agentd.errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotFound,
    Unavailable,
    Unimplemented,
)
from agentd.testing import FakeHost, run_turn
from agentd.tools import ToolError, ToolErrorKind


class Greeter(Agent):
    name = "greeter"

    async def handle(self, ctx, message):
        ctx.state["visits"] = ctx.state.get("visits", 0) + 1
        return f"hello {message.text}, visit {ctx.state['visits']} to {ctx.address}"


class Scout(Agent):
    """Every Context call in one turn."""

    name = "scout"

    async def handle(self, ctx, message):
        result = await ctx.infer("decision", {"features": message}, outputs=("action",))
        action = int(result["action"][0])
        ctx.state["action"] = action
        await ctx.send("base/main", (ctx.address.id, action))
        verdict = await ctx.ask("judge/1", action, timeout=2.0)
        words = [piece async for piece in ctx.generate("why?", max_tokens=8)]
        miles = await ctx.tool("km_to_miles", {"km": 16.09344})
        return {"verdict": verdict, "words": words, "miles": miles}


async def test_a_turn_returns_the_reply_and_the_new_state():
    state = {"visits": 1}
    turn = await run_turn(Greeter(), Message(text="world"), state)
    assert turn.reply == "hello world, visit 2 to greeter/default"
    assert turn.state == {"visits": 2}
    assert state == {"visits": 1}, "the caller's state is the turn's input, not its working copy"
    turn = await run_turn(Greeter, Message(text="x"), turn.state, address="greeter/alice")
    assert turn.reply == "hello x, visit 3 to greeter/alice"


async def test_every_context_call_is_answered_and_recorded():
    host = FakeHost(
        infer={"decision": lambda inputs: {"action": np.array([2]), "scores": inputs["features"]}},
        asks={"judge": lambda action: f"fine: {action}"},
        generate={"tinylm": ["because", " so"]},
        tools={"km_to_miles": lambda km: round(km / 1.609344, 2)},
    )
    features = np.zeros((1, 16), np.float32)
    turn = await run_turn(Scout(), features, host=host, address="scout/7")
    assert turn.reply == {"verdict": "fine: 2", "words": ["because", " so"], "miles": 10.0}
    assert turn.state == {"action": 2}
    (inferred,) = host.inferred
    assert inferred.model == "decision" and inferred.outputs == ("action",)
    assert inferred.inputs["features"] is features
    assert host.sent == [(Address("base", "main"), ("7", 2))]
    assert [(a.address, a.message, a.timeout) for a in host.asked] == [
        (Address("judge", "1"), 2, 2.0)
    ]
    (generated,) = host.generated
    assert generated.model == "tinylm" and generated.prompt == "why?"
    assert generated.params.max_tokens == 8
    assert [(c.name, c.args) for c in host.tool_calls] == [("km_to_miles", {"km": 16.09344})]


async def test_canned_errors_and_async_answers():
    async def slow_judge(message):
        await asyncio.sleep(0)
        return "slow"

    host = FakeHost(
        infer={"decision": Unavailable("model not loaded")},
        asks={"judge/1": slow_judge},
        tools={},
    )
    ctx = Context(Address("t", "1"), {}, None, host)
    with pytest.raises(Unavailable, match="not loaded"):
        await ctx.infer("decision", {})
    with pytest.raises(NotFound, match="model"):
        await ctx.infer("other", {})
    assert await ctx.ask("judge/1", "?") == "slow"
    with pytest.raises(NotFound, match="judge/2"):
        await ctx.ask("judge/2", "?")
    with pytest.raises(InvalidArgument):
        await ctx.send("Not An Address/", "?")
    with pytest.raises(ToolError, match="tool") as caught:  # as the tool service answers
        await ctx.tool("missing")
    assert caught.value.kind is ToolErrorKind.NOT_FOUND


async def test_what_a_host_without_models_or_tools_answers():
    ctx = Context(Address("t", "1"), {}, None, FakeHost())
    with pytest.raises(Unimplemented, match="language models"):
        async for _ in ctx.generate("hi"):
            pass
    with pytest.raises(Unavailable, match="tool"):
        await ctx.tool("anything")
    detached = Context(Address("t", "1"), {}, None)
    with pytest.raises(Unimplemented, match="not attached"):
        await detached.ask("t/2", "hi")


async def test_the_deadline_and_the_state_rules_hold_as_in_the_runtime():
    class Slow(Agent):
        name = "slow"

        async def handle(self, ctx, message):
            assert 0 < ctx.time_left() <= 0.05
            await asyncio.sleep(10)

    with pytest.raises(DeadlineExceeded):
        await run_turn(Slow(), None, timeout=0.05)

    class Sloppy(Agent):
        name = "sloppy"

        async def handle(self, ctx, message):
            ctx.state["when"] = object()

    with pytest.raises(Internal, match="not JSON-serialisable"):
        await run_turn(Sloppy(), None)


async def test_a_streamed_turn_returns_its_events():
    class Counter(Agent):
        name = "counter"

        async def stream(self, ctx, message):
            for i in range(message):
                ctx.state["last"] = i
                yield str(i)

    turn = await run_turn(Counter(), 3, stream=True)
    assert turn.reply == ["0", "1", "2"]
    assert turn.state == {"last": 2}


class DocScout(Agent):
    """docs/runtime.md's first example, tested as the docs show."""

    name = "scout"

    async def handle(self, ctx, message):
        features = message
        result = await ctx.infer("decision", {"features": features})
        ctx.state["last_action"] = int(result["action"][0])
        await ctx.send("base/main", (ctx.address.id, ctx.state["last_action"]))


async def test_the_docs_example():
    host = FakeHost(infer={"decision": {"action": np.array([2])}})
    turn = await run_turn(DocScout(), np.zeros((1, 16), np.float32), host=host, address="scout/7")
    assert turn.state == {"last_action": 2}
    assert host.sent == [(Address("base", "main"), ("7", 2))]


def test_the_agent_sdk_loads_without_the_runtime():
    # The agents package is typed against a host protocol: importing it (and the fake host)
    # must not pull the runtime in.
    code = (
        "import sys, agentd.agents, agentd.testing.agents;"
        "bad = sorted(m for m in sys.modules if m.startswith(('agentd.runtime', 'agentd.swarm')));"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
