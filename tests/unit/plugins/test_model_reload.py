"""ModelPlugins and GenerationService.load/unload, in process, against the real services
over a plugin folder with copies of the built-in models: the newest write wins with one load
at a time, a refused or half-written folder keeps the old version serving (and a complete
write recovers), a folder that changes kind moves to the other service, a language model
unloaded under a running stream lets it finish, aclose leaves nothing open."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from agentd.errors import NotFound
from agentd.generate.service import GenerationService
from agentd.generate.types import SamplingParams
from agentd.inference import InferenceService, ModelRepository
from agentd.inference.onnx_runtime import OnnxLoader
from agentd.models.catalog import ModelCatalog, builtin_models_dir
from agentd.plugins import Verifier
from agentd.plugins.manager import kind_of
from agentd.plugins.manifest import build_manifest
from agentd.plugins.models import ModelPlugins

FEATURES = {"features": np.ones((1, 16), dtype=np.float32)}


def _copy(model: str, folder: Path, name: str) -> Path:
    target = folder / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(builtin_models_dir() / model, target)
    config = target / "config.yaml"
    text = config.read_text().replace(f"name: {model}\n", f"name: {name}\n", 1)
    config.write_text(text.replace("eos_token_ids: [1]", "eos_token_ids: [5]"))
    return target


def _set_version(folder: Path, version: str) -> None:
    config = folder / "config.yaml"
    lines = [
        f'version: "{version}"' if line.startswith("version:") else line
        for line in config.read_text().splitlines()
    ]
    config.write_text("\n".join(lines) + "\n")


class _Node:
    def __init__(self, plugins: Path) -> None:
        self.models = plugins / "models"
        self.catalog = ModelCatalog([self.models])
        self.inference = InferenceService(ModelRepository([OnnxLoader()], self.catalog))
        self.generation = GenerationService(self.catalog)

    def handler(self, verifier: Verifier | None = None) -> ModelPlugins:
        check = verifier.check_folder if verifier is not None else None
        return ModelPlugins(
            self.inference, self.generation, self.models, catalog=self.catalog, check=check
        )


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[_Node]:
    (tmp_path / "models").mkdir()
    _copy("decision", tmp_path / "models", "dec")
    built = _Node(tmp_path)
    await built.inference.start()
    await built.generation.start()
    yield built
    await built.generation.aclose()
    await built.inference.aclose()


def _served_version(node: _Node, name: str = "dec") -> str:
    return node.inference.metadata(name).version


def test_kind_of_hands_model_files_and_folders_to_models(tmp_path: Path) -> None:
    assert kind_of(tmp_path, tmp_path / "models" / "m" / "config.yaml") == "models"
    assert kind_of(tmp_path, tmp_path / "models" / "m") == "models"  # renamed into place
    assert kind_of(tmp_path, tmp_path / "models" / "m" / ".config.yaml.swp") is None


async def test_newest_write_wins_one_load_at_a_time(node: _Node) -> None:
    plugins = node.handler()
    folder = node.models / "dec"
    plugins.changed(plugins.files())  # adopts what serves
    await plugins.settled()
    loads = 0
    original = node.inference.load

    async def counted(name: str):  # the real load, counted and checked for overlap
        nonlocal loads
        loads += 1
        assert loads - finished == 1, "two loads of one model at once"
        try:
            return await original(name)
        finally:
            done()

    finished = 0

    def done() -> None:
        nonlocal finished
        finished += 1

    node.inference.load = counted  # type: ignore[method-assign]
    for version in range(2, 12):
        _set_version(folder, str(version))
        plugins.changed([folder / "config.yaml"])
        await asyncio.sleep(0)
    await plugins.settled()
    assert _served_version(node) == "11"
    assert 1 <= loads <= 3  # the writes during a load give one more load, not ten
    row = next(r for r in plugins.status() if r["name"] == "dec")
    assert row["state"] == "READY" and row["kind"] == "tensor" and row["version"]
    assert row["last_failure"] is None and row["loaded_at"] is not None


async def test_refused_or_half_written_keeps_old_serving_then_recovers(
    node: _Node, tmp_path: Path
) -> None:
    folder = node.models / "dec"
    (tmp_path / "MANIFEST").write_bytes(build_manifest(tmp_path).to_bytes())
    plugins = node.handler(Verifier(tmp_path))
    plugins.changed(plugins.files())
    await plugins.settled()

    _set_version(folder, "2")  # not what MANIFEST says
    plugins.changed([folder / "config.yaml"])
    await plugins.settled()
    assert _served_version(node) == "1"
    failure = plugins.failures()[folder.resolve()]
    assert failure.outcome == "refused" and "MANIFEST" in failure.reason
    assert (await node.inference.infer("dec", FEATURES))["probabilities"].shape == (1, 4)

    (tmp_path / "MANIFEST").unlink()  # development: every file allowed
    model = folder / "model.onnx"
    whole = model.read_bytes()
    model.write_bytes(whole[: len(whole) // 2])  # a copy caught half-way
    plugins.changed([model])
    await plugins.settled()
    assert _served_version(node) == "1"
    assert plugins.failures()[folder.resolve()].outcome == "failed"
    row = next(r for r in plugins.status() if r["name"] == "dec")
    assert row["state"] == "READY" and row["last_failure"]["outcome"] == "failed"

    model.write_bytes(whole)  # the completed write loads
    plugins.changed([model])
    await plugins.settled()
    assert _served_version(node) == "2"
    assert plugins.failures() == {}


async def test_new_folder_kind_change_and_delete(node: _Node) -> None:
    plugins = node.handler()
    plugins.changed(plugins.files())
    await plugins.settled()
    # A new folder, a language model, loads.
    lm = _copy("tinylm", node.models, "lm")
    plugins.changed([lm / "config.yaml"])
    await plugins.settled()
    assert node.generation.get("lm").config.context_length == 1024
    # The tensor folder becomes a language model: it moves to the generation service.
    _copy("tinylm", node.models, "dec")
    plugins.changed([node.models / "dec" / "config.yaml"])
    await plugins.settled()
    assert node.generation.get("dec").name == "dec"
    with pytest.raises(NotFound):
        node.inference.metadata("dec")
    assert next(r for r in plugins.status() if r["name"] == "dec")["kind"] == "language-model"
    # Deleted folders unload.
    shutil.rmtree(node.models / "dec")
    shutil.rmtree(lm)
    plugins.changed([node.models / "dec" / "config.yaml", lm / "model.onnx"])
    await plugins.settled()
    for name in ("dec", "lm"):
        with pytest.raises(NotFound):
            node.generation.get(name)
    assert plugins.status() == []
    await plugins.aclose()


async def test_a_folder_overriding_a_builtin_model_serves_and_its_deletion_restores_it(
    tmp_path: Path,
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    catalog = ModelCatalog([builtin_models_dir(), models])
    inference = InferenceService(ModelRepository([OnnxLoader()], catalog))
    await inference.start()
    plugins = ModelPlugins(inference, None, models, catalog=catalog)
    plugins.changed(plugins.files())  # the manager's first scan: nothing here yet
    try:
        folder = _copy("decision", models, "decision")
        _set_version(folder, "7")
        plugins.changed([folder / "config.yaml"])
        await plugins.settled()
        assert inference.metadata("decision").version == "7"
        shutil.rmtree(folder)
        plugins.changed([folder / "config.yaml"])
        await plugins.settled()
        assert inference.metadata("decision").version == "1"  # the built-in again
    finally:
        await plugins.aclose()
        await inference.aclose()


async def test_language_model_unload_lets_a_running_stream_finish(node: _Node) -> None:
    _copy("tinylm", node.models, "lm")
    model = await node.generation.load("lm")
    stream = node.generation.complete(model, "one two", SamplingParams(max_tokens=300, seed=1))
    pieces = aiter(stream)
    first = await anext(pieces)
    await node.generation.unload("lm")  # new requests: NotFound at once
    with pytest.raises(NotFound):
        node.generation.get("lm")
    rest = [piece async for piece in pieces]
    assert first and stream.finish_reason == "length" and stream.completion_tokens == 300
    assert len(rest) > 0
    with pytest.raises(NotFound):
        await node.generation.unload("lm")


async def test_failed_language_model_load_keeps_the_old_and_aclose_closes_all(
    node: _Node,
) -> None:
    folder = _copy("tinylm", node.models, "lm")
    old = await node.generation.load("lm")
    (folder / "config.yaml").write_text("kind: language-model\nplatform: onnxruntime\n")
    with pytest.raises(Exception, match="lm"):
        await node.generation.load("lm")
    assert node.generation.get("lm") is old and "lm" in node.generation.failed
    # A load cancelled half-way: aclose still closes what it built.
    _copy("tinylm", node.models, "lm")
    loading = asyncio.create_task(node.generation.load("lm"))
    await asyncio.sleep(0.01)
    loading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await loading
    await node.generation.aclose()
    assert node.generation.models() == [] and not node.generation._building
