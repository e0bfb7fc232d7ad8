import asyncio

import pytest

from agentd import Agent, Message
from agentd.agents import AgentRegistry
from agentd.errors import DeadlineExceeded, Internal, InvalidArgument, NotFound
from agentd.runtime import Runtime


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


class Broken(Agent):
    name = "broken"

    async def handle(self, ctx, message):
        raise KeyError("missing")


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
        log.append(("start", message.text))
        await asyncio.sleep(0.001)
        log.append(("end", message.text))
        return str(len(log))


@pytest.fixture
def recorder():
    return Recorder()


@pytest.fixture
def runtime(recorder):
    registry = AgentRegistry()
    for cls in (Sleepy, Broken, Streamer, Sequencer):
        registry.register(cls)
    return Runtime(registry, max_instances=3, observer=recorder)


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


async def test_agent_exception_becomes_internal(runtime):
    with pytest.raises(Internal, match="KeyError"):
        await runtime.invoke("broken", Message())


async def test_unknown_and_malformed(runtime):
    with pytest.raises(NotFound):
        await runtime.invoke("ghost", Message())
    with pytest.raises(InvalidArgument):
        await runtime.invoke("Bad/", Message())


async def test_one_turn_at_a_time_per_instance(runtime):
    await asyncio.gather(*(runtime.invoke("seq/1", Message(text=str(i))) for i in range(20)))
    _, instance = runtime._instance("seq/1")
    log = instance.state["log"]
    # Every start is immediately followed by its own end: no interleaving.
    assert all(log[i][0] == "start" and log[i + 1] == ("end", log[i][1]) for i in range(0, 40, 2))


async def test_stream_and_stream_deadline(runtime, recorder):
    events = [e async for _, e in runtime.stream("streamer", Message(text="0"))]
    assert events == ["0", "1", "2"]
    with pytest.raises(DeadlineExceeded):
        async for _ in runtime.stream("streamer", Message(text="0.05"), timeout=0.08):
            pass
    assert recorder.turns[-1] == ("streamer", "deadline")


async def test_instances_are_bounded(runtime):
    for i in range(10):
        await runtime.invoke(f"sleepy/{i}", Message(text="0"))
    assert sum(t.active_instances for t in runtime.list_types()) == 3
