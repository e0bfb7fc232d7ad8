"""Live reload of model folders on a real ``agentd serve --plugins DIR`` whose
``models/`` holds a copy of the built-in decision model (``decision-copy``) and of tinylm
(``tinylm-copy``): an edited config reloads the tensor model while clients call it (no call
fails); a broken config keeps the old version serving and is reported, and a good write
recovers; a language model reloads while a stream runs (the stream completes, later
requests get the new version); ``agentd models unload|load`` a language model; a deleted
folder unloads its model."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from agentd.models.catalog import builtin_models_dir
from agentd.testing import RunningServer, start_server
from tests.conftest import metric_value

CLIENTS = 8
TENSOR = "decision-copy"
LM = "tinylm-copy"
# tinylm-copy never sees its end token (it ends on <|pad|>, which it does not generate): a
# stream of this many tokens runs a few seconds, past a reload.
STREAM_TOKENS = 1000
BODY = {
    "inputs": [
        {
            "name": "features",
            "datatype": "FP32",
            "shape": [1, 16],
            "data": np.random.default_rng(1).random(16, dtype=np.float32).tolist(),
        }
    ]
}


def _copy(name: str, to: Path) -> Path:
    folder = to / "models" / f"{name}-copy"
    shutil.copytree(builtin_models_dir() / name, folder)
    config = folder / "config.yaml"
    text = config.read_text().replace(f"name: {name}\n", f"name: {name}-copy\n", 1)
    config.write_text(text.replace("eos_token_ids: [1]", "eos_token_ids: [5]"))
    return folder


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Path]]:
    plugins = tmp_path_factory.mktemp("plugins")
    _copy("decision", plugins)
    _copy("tinylm", plugins)
    running = start_server(["--plugins", str(plugins)], timeout=90)
    yield running, plugins / "models"
    running.stop()


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (old, text)
    path.write_text(text.replace(old, new, 1))


async def _until(check: Callable[[], object], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(check):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def _version(url: str) -> str | None:
    r = httpx.post(f"{url}/v2/models/{TENSOR}/infer", json=BODY, timeout=30)
    return r.json()["model_version"] if r.status_code == 200 else None


def _metric(url: str, outcome: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return metric_value(text, "agentd_plugin_reloads_total", kind="models", outcome=outcome)


async def test_tensor_reload_under_load_then_broken_config_keeps_serving(served) -> None:
    server, models = served
    config = models / TENSOR / "config.yaml"
    assert _version(server.url) == "1"
    failures: list[str] = []
    versions: set[str] = set()
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:

        async def client() -> None:
            while not stop.is_set():
                r = await http.post(f"/v2/models/{TENSOR}/infer", json=BODY)
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:200]}")
                    continue
                versions.add(r.json()["model_version"])

        clients = [asyncio.create_task(client()) for _ in range(CLIENTS)]
        try:
            await asyncio.sleep(0.3)
            _edit(config, 'version: "1"', 'version: "2"')
            await _until(lambda: "2" in versions, "the new version to answer")
            await asyncio.sleep(0.3)  # a few calls on the new version
        finally:
            stop.set()
            await asyncio.gather(*clients)
    assert failures == []
    assert versions == {"1", "2"}

    # A broken config: the reload fails, the old version keeps serving, it is reported.
    failed = _metric(server.url, "failed")
    _edit(config, "inputs:", "inputs: [broken")
    await _until(lambda: _metric(server.url, "failed") > failed, "the failed reload")
    assert _version(server.url) == "2"
    assert any(f"model {TENSOR} failed to reload (still serving)" in x for x in server.output)
    row = _plugin_row(server.url, TENSOR)
    assert row["state"] == "READY" and row["kind"] == "tensor"
    assert row["last_failure"]["outcome"] == "failed" and row["last_failure"]["reason"]
    served = row["version"]
    # A later good write recovers.
    _edit(config, "inputs: [broken", "inputs:")
    _edit(config, 'version: "2"', 'version: "3"')
    await _until(lambda: _version(server.url) == "3", "the good write to load")
    await _until(lambda: _plugin_row(server.url, TENSOR)["last_failure"] is None, "recovery")
    assert _plugin_row(server.url, TENSOR)["version"] not in (None, served)


def _plugin_row(url: str, name: str) -> dict:
    rows = httpx.get(f"{url}/v1/plugins", timeout=30).json()["models"]
    return next(row for row in rows if row["name"] == name)


async def test_language_model_reload_while_streams_run(served) -> None:
    server, models = served
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    started = asyncio.Event()

    async def stream(seed: int) -> str | None:
        chunks = await client.completions.create(
            model=LM, prompt="one two", max_tokens=STREAM_TOKENS, seed=seed, stream=True
        )
        finish = None
        async for chunk in chunks:
            started.set()
            finish = chunk.choices[0].finish_reason or finish
        return finish

    async with client:
        assert (await client.models.retrieve(LM)).model_extra["context_length"] == 1024
        streams = [asyncio.create_task(stream(seed)) for seed in range(3)]
        await started.wait()
        # The streams run: the model reloads under them (a smaller context, to tell).
        _edit(models / LM / "config.yaml", "context_length: 1024", "context_length: 512")
        deadline = time.monotonic() + 60
        while (await client.models.retrieve(LM)).model_extra["context_length"] != 512:
            assert time.monotonic() < deadline, "the reload did not happen"
            await asyncio.sleep(0.05)
        assert not all(s.done() for s in streams), "the streams ended before the reload"
        # Each stream runs to its end on the old version: none is cut.
        async with asyncio.timeout(120):
            assert await asyncio.gather(*streams) == ["length"] * 3
        # Later requests get the new version, and it generates.
        answer = await client.completions.create(model=LM, prompt="one two", max_tokens=5)
        assert answer.choices[0].text


def _cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentd", "models", *args, "--url", url],
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_cli_unloads_and_loads_a_language_model_and_a_deleted_folder_unloads(
    served,
) -> None:
    server, models = served
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    async with client:
        done = await asyncio.to_thread(_cli, server.url, "unload", LM)
        assert done.returncode == 0, done.stderr
        with pytest.raises(openai.NotFoundError) as caught:
            await client.completions.create(model=LM, prompt="one", max_tokens=2)
        assert caught.value.code == "model_not_found"
        done = await asyncio.to_thread(_cli, server.url, "load", LM)
        assert done.returncode == 0, done.stderr
        answer = await client.completions.create(model=LM, prompt="one", max_tokens=2)
        assert answer.choices

        # Deleting the folders unloads both models: NOT_FOUND after.
        shutil.rmtree(models / LM)
        shutil.rmtree(models / TENSOR)

        def gone() -> bool:
            kserve = httpx.post(f"{server.url}/v2/models/{TENSOR}/infer", json=BODY, timeout=30)
            lm = httpx.get(f"{server.url}/v1/models/{LM}", timeout=30)
            return kserve.status_code == 404 and lm.status_code == 404

        await _until(gone, "the deleted folders to unload")
        assert _metric(server.url, "removed") >= 2
