"""A caller that goes away cancels its agent's turn, and the turn's queued inference row."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from agentd import Agent, Message
from agentd.agents import AgentRegistry
from agentd.errors import DeadlineExceeded
from agentd.inference import BatchingConfig, DynamicBatcher
from agentd.runtime import ActorHost, MemoryStateStore, Runtime, WorkerPool


class GatedModel:
    def __init__(self):
        self.gate = threading.Event()
        self.rows = 0

    def __call__(self, inputs):
        self.gate.wait(10)
        self.rows += inputs["x"].shape[0]
        return {"y": inputs["x"] + 1}


class OneModel:
    """The inference interface the host needs, over one real DynamicBatcher."""

    def __init__(self, batcher: DynamicBatcher):
        self.batcher = batcher

    def infer_nowait(self, name, inputs, *, version=None, outputs=None):
        return self.batcher.submit_nowait(inputs, inputs["x"].shape[0], outputs)


class Thinker(Agent):
    name = "thinker"

    async def handle(self, ctx, message):
        result = await ctx.infer("m", {"x": np.full((1, 2), float(message.text))})
        return str(result["y"][0, 0])


async def test_disconnect_drops_the_queued_inference_row():
    model = GatedModel()
    with ThreadPoolExecutor(1) as pool:
        batcher = DynamicBatcher("m", model, BatchingConfig(16, 0, 100), pool)
        registry = AgentRegistry()
        registry.register(Thinker)
        host = ActorHost(
            registry, MemoryStateStore(), pool=WorkerPool(4, 16), inference=OneModel(batcher)
        )
        runtime = Runtime(host)
        await runtime.start()
        first = asyncio.ensure_future(runtime.invoke("thinker/a", Message(text="1")))
        await asyncio.sleep(0.05)  # the first row is running (blocked in the model)
        second = asyncio.ensure_future(runtime.invoke("thinker/b", Message(text="2")))
        await asyncio.sleep(0.05)  # the second row waits in the batcher's queue
        assert batcher.stats.queued == 1
        second.cancel()  # the client disconnects
        await asyncio.sleep(0.05)
        model.gate.set()
        assert (await first)[1].text == "2.0"
        await asyncio.sleep(0.05)
        assert batcher.stats.dropped_cancelled == 1
        assert model.rows == 1  # the abandoned row never ran
        await runtime.aclose()
        await batcher.aclose()


async def test_the_turn_deadline_drops_the_queued_inference_row_at_the_deadline():
    model = GatedModel()
    with ThreadPoolExecutor(1) as pool:
        batcher = DynamicBatcher("m", model, BatchingConfig(16, 0, 100), pool)
        registry = AgentRegistry()
        registry.register(Thinker)
        host = ActorHost(
            registry, MemoryStateStore(), pool=WorkerPool(4, 16), inference=OneModel(batcher)
        )
        runtime = Runtime(host)
        await runtime.start()
        first = asyncio.ensure_future(runtime.invoke("thinker/a", Message(text="1")))
        await asyncio.sleep(0.05)  # the first row is running (blocked in the model)
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await runtime.invoke("thinker/b", Message(text="2"), timeout=0.2)
        assert time.monotonic() - started < 0.8  # at the deadline, not when the model frees
        model.gate.set()
        assert (await first)[1].text == "2.0"
        await asyncio.sleep(0.05)
        assert batcher.stats.dropped_cancelled == 1
        assert model.rows == 1  # the expired row never ran
        await runtime.aclose()
        await batcher.aclose()
