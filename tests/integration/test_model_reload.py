"""Reloading a model on a live server while 64 clients call it over HTTP: every call
succeeds (the old version serves until the new one is ready, calls it accepted finish on
it), through 20 reloads with ``POST /v2/repository/models/{name}/load``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from agentd.testing import RunningServer, start_server

CLIENTS = 64
RELOADS = 20
MODEL = "decision"


@pytest.fixture(scope="module")
def reload_server() -> Iterator[RunningServer]:
    running = start_server([], timeout=60)
    yield running
    running.stop()


def _request(i: int) -> dict:
    features = np.random.default_rng(i).random(16, dtype=np.float32)
    return {
        "inputs": [
            {"name": "features", "datatype": "FP32", "shape": [1, 16], "data": features.tolist()}
        ]
    }


async def test_64_http_clients_through_20_reloads_see_no_error(reload_server):
    stop = asyncio.Event()
    failures: list[str] = []
    calls = [0] * CLIENTS
    limits = httpx.Limits(max_connections=CLIENTS + 1, max_keepalive_connections=CLIENTS + 1)
    async with httpx.AsyncClient(base_url=reload_server.url, timeout=30, limits=limits) as http:

        async def client(i: int) -> None:
            body = _request(i)
            while not stop.is_set():
                r = await http.post(f"/v2/models/{MODEL}/infer", json=body)
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text}")
                    continue
                outputs = {o["name"]: o for o in r.json()["outputs"]}
                assert outputs["probabilities"]["shape"] == [1, 4]
                calls[i] += 1

        clients = [asyncio.create_task(client(i)) for i in range(CLIENTS)]
        try:
            await asyncio.sleep(0.5)  # every client is calling
            for _ in range(RELOADS):
                r = await http.post(f"/v2/repository/models/{MODEL}/load")
                assert r.status_code == 200, r.text
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await asyncio.gather(*clients)
        ready = await http.get(f"/v2/models/{MODEL}/ready")
    assert failures == []
    assert all(calls), calls  # every client was served
    assert ready.status_code == 200
