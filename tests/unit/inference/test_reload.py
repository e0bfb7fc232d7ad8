"""Reloading a model under load serves every call (the old version until the new one is
ready); unloading and shutting down answer every waiting caller, none hangs. In process,
against the inference service with the built-in ``decision`` model."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from agentd.errors import AgentdError, Unavailable
from agentd.inference import InferenceService, ModelRepository
from agentd.inference.onnx_runtime import OnnxLoader
from agentd.inference.repository import builtin_models_dir

CLIENTS = 64
RELOADS = 20
CALL_TIMEOUT_S = 10.0  # a call that hangs becomes an error instead of a stuck test


@pytest.fixture
async def service():
    svc = InferenceService(ModelRepository([OnnxLoader()], [builtin_models_dir()]))
    await svc.start()
    yield svc
    await svc.aclose()


def _features(i: int) -> dict[str, np.ndarray]:
    return {"features": np.random.default_rng(i).random((1, 16), dtype=np.float32)}


async def test_64_clients_through_20_reloads_see_no_error(service):
    stop = asyncio.Event()
    errors: list[BaseException] = []
    calls = [0] * CLIENTS

    async def client(i: int) -> None:
        inputs = _features(i)
        while not stop.is_set():
            try:
                result = await service.infer("decision", inputs, timeout=CALL_TIMEOUT_S)
            except (AgentdError, TimeoutError) as exc:
                errors.append(exc)
                continue
            assert result["probabilities"].shape == (1, 4)
            calls[i] += 1

    clients = [asyncio.create_task(client(i)) for i in range(CLIENTS)]
    try:
        await asyncio.sleep(0.05)
        for _ in range(RELOADS):
            entry = await service.load("decision")
            assert entry.load_error == ""
            assert service.is_ready("decision")
            await asyncio.sleep(0.01)  # let calls reach the new version's batcher
    finally:
        stop.set()
        await asyncio.gather(*clients)
    assert errors == []
    assert all(calls), calls  # every client was served


@pytest.mark.parametrize("close", ["unload", "shutdown"])
async def test_unload_and_shutdown_answer_every_waiting_caller(service, close):
    outcomes: list[object] = []

    async def client(i: int) -> None:
        inputs = _features(i)
        while True:  # until the model is gone
            try:
                await service.infer("decision", inputs, timeout=CALL_TIMEOUT_S)
            except (AgentdError, TimeoutError) as exc:
                outcomes.append(exc)
                return
            outcomes.append("ok")

    clients = [asyncio.create_task(client(i)) for i in range(CLIENTS)]
    await asyncio.sleep(0.1)  # batches running and queued
    if close == "unload":
        await service.unload("decision")
    else:
        await service.aclose()
    async with asyncio.timeout(2 * CALL_TIMEOUT_S):
        await asyncio.gather(*clients)
    failures = [o for o in outcomes if o != "ok"]
    assert len(failures) == CLIENTS
    # Each caller was served, or told clearly that the model went away: none timed out.
    assert all(isinstance(f, Unavailable) for f in failures), failures
    assert all("model 'decision'" in f.message for f in failures), failures
