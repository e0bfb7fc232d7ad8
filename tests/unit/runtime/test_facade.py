"""The runtime facade and the actor host behind it, with in-memory state."""

from __future__ import annotations

import asyncio

import pytest

from agentd import Agent, Message
from agentd.agents import AgentRegistry
from agentd.errors import DeadlineExceeded, Internal, InvalidArgument, NotFound
from agentd.runtime import ActorHost, MemoryStateStore, Runtime, WorkerPool


class Recorder:
    def __init__(self):
        self.turns = []

    def turn_finished(self, agent_type, outcome, seconds):
        self.turns.append((agent_type, outcome))


class Sleepy(Agent):
    name = "sleepy"
    cancelled = 0

    async def handle(self, ctx, message):
        try:
            await asyncio.sleep(float(message.text))
        except asyncio.CancelledError:
            Sleepy.cancelled += 1
            raise
        return Message(text="woke", metadata={"id": ctx.address.id})


class Flaky(Agent):
    name = "flaky"

    async def handle(self, ctx, message):
        ctx.state["n"] = ctx.state.get("n", 0) + 1
        if message.text == "fail":
            raise KeyError("missing")
        return str(ctx.state["n"])


class Streamer(Agent):
    name = "streamer"

    async def stream(self, ctx, message):
        for i in range(3):
            await asyncio.sleep(float(message.text))
            yield str(i)


class Sequencer(Agent):
    name = "seq"

    async def handle(self, ctx, message):
        log = ctx.state.setdefault("log", [])
        log.append(["start", message.text])
        await asyncio.sleep(0.001)
        log.append(["end", message.text])
        return str(len(log))


class Relay(Agent):
    name = "relay"

    async def handle(self, ctx, message):
        return await ctx.ask("seq/relayed", message, timeout=float(message.metadata.get("t", 5)))


@pytest.fixture
def recorder():
    return Recorder()


@pytest.fixture
async def runtime(recorder):
    registry = AgentRegistry()
    for cls in (Sleepy, Flaky, Streamer, Sequencer, Relay):
        registry.register(cls)
    store = MemoryStateStore()
    host = ActorHost(registry, store, pool=WorkerPool(8, 100), observer=recorder)
    rt = Runtime(host)
    await rt.start()
    yield rt
    await rt.aclose()


async def test_invoke_returns_address_and_reply(runtime, recorder):
    address, reply = await runtime.invoke("sleepy/x", Message(text="0"))
    assert str(address) == "sleepy/x"
    assert reply == Message(text="woke", metadata={"id": "x"})
    assert recorder.turns == [("sleepy", "ok")]


async def test_deadline_cancels_the_turn(runtime, recorder):
    before = Sleepy.cancelled
    with pytest.raises(DeadlineExceeded):
        await runtime.invoke("sleepy", Message(text="10"), timeout=0.05)
    assert Sleepy.cancelled == before + 1
    assert recorder.turns == [("sleepy", "deadline")]


async def test_failed_turn_keeps_last_good_state(runtime):
    assert (await runtime.invoke("flaky/a", Message()))[1].text == "1"
    with pytest.raises(Internal, match="KeyError"):
        await runtime.invoke("flaky/a", Message(text="fail"))
    # The failed turn's increment was rolled back; the agent is still usable.
    assert (await runtime.invoke("flaky/a", Message()))[1].text == "2"


async def test_unknown_and_malformed(runtime):
    with pytest.raises(NotFound):
        await runtime.invoke("ghost", Message())
    with pytest.raises(InvalidArgument):
        await runtime.invoke("Bad/", Message())


async def test_one_turn_at_a_time_per_instance(runtime):
    await asyncio.gather(*(runtime.invoke("seq/1", Message(text=str(i))) for i in range(20)))
    reply = await runtime.invoke("seq/1", Message(text="last"))
    assert reply[1].text == "42"
    activation = runtime.host._activations[runtime.host._activation("seq/1").address]
    log = activation.state["log"]
    # Every start is immediately followed by its own end: no interleaving.
    assert all(log[i][0] == "start" and log[i + 1] == ["end", log[i][1]] for i in range(0, 42, 2))


async def test_stream_and_stream_deadline(runtime, recorder):
    events = [e async for _, e in runtime.stream("streamer", Message(text="0"))]
    assert events == ["0", "1", "2"]
    with pytest.raises(DeadlineExceeded):
        async for _ in runtime.stream("streamer", Message(text="0.05"), timeout=0.08):
            pass
    assert recorder.turns[-1] == ("streamer", "deadline")


async def test_ask_between_agents_and_ask_timeout(runtime):
    _, reply = await runtime.invoke("relay/1", Message(text="hi"))
    assert reply.text == "2"
    with pytest.raises(DeadlineExceeded):
        await runtime.host.ask("sleepy/t", Message(text="5"), timeout=0.05)


async def test_caller_cancellation_cancels_the_running_turn(runtime, recorder):
    before = Sleepy.cancelled
    task = asyncio.ensure_future(runtime.invoke("sleepy/c", Message(text="10")))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.01)
    assert Sleepy.cancelled == before + 1
    assert recorder.turns[-1] == ("sleepy", "cancelled")
    # The instance serves the next message.
    assert (await runtime.invoke("sleepy/c", Message(text="0")))[1].text == "woke"


async def test_passivation_keeps_state(runtime):
    await runtime.invoke("flaky/p", Message())
    assert runtime.host.passivate_idle(0) >= 1
    counts = {t.name: t.active_instances for t in runtime.list_types()}
    assert counts["flaky"] == 0
    assert (await runtime.invoke("flaky/p", Message()))[1].text == "2"


class Toggle(Agent):
    name = "toggle"

    async def handle(self, ctx, message):
        if message.text == "set":
            ctx.state["on"] = True
        elif message.text == "clear":
            ctx.state.clear()
        return "ok"


async def test_only_turns_that_change_the_state_store_it():
    registry = AgentRegistry()
    registry.register(Sleepy)
    registry.register(Toggle)
    store = MemoryStateStore()
    host = ActorHost(registry, store, pool=WorkerPool(4, 100))
    await host.start()
    try:
        # Stateless agents leave no rows behind, told or asked.
        await host.ask("sleepy/a", Message(text="0"))
        await host.tell("sleepy/b", Message(text="0"))
        await host.ask("toggle/t", Message(text="noop"))
        async with asyncio.timeout(5):
            while host.turns < 3:  # the told turn too
                await asyncio.sleep(0.001)
        assert store.writes == 0 and store.snapshots == {}
        await host.ask("toggle/t", Message(text="set"))
        await host.ask("toggle/t", Message(text="set"))  # unchanged: no second write
        assert store.writes == 1 and store.snapshots["toggle/t"] == b'{"on":true}'
        await host.ask("toggle/t", Message(text="clear"))  # emptied: stored as such
        assert store.writes == 2 and store.snapshots["toggle/t"] == b"{}"
    finally:
        await host.aclose()
