"""The model catalogue: one reading of each model folder, its kind, shared by both services."""

from __future__ import annotations

import shutil
from pathlib import Path

from agentd.generate.service import GenerationService
from agentd.inference import ModelRepository
from agentd.inference.onnx_runtime import OnnxLoader
from agentd.models.catalog import ModelCatalog, ModelKind, builtin_models_dir


def _plugins(tmp_path: Path) -> Path:
    folder = tmp_path / "models"
    shutil.copytree(builtin_models_dir() / "decision", folder / "picker")
    (folder / "picker" / "config.yaml").write_text(
        (folder / "picker" / "config.yaml").read_text().replace("decision", "picker")
    )
    shutil.copytree(builtin_models_dir() / "tinylm", folder / "chat")
    config = (folder / "chat" / "config.yaml").read_text().replace("name: tinylm", "name: chat")
    (folder / "chat" / "config.yaml").write_text(config)
    (folder / "broken").mkdir()
    (folder / "broken" / "config.yaml").write_text("name: [unclosed\n")
    (folder / "_private").mkdir()
    return folder


def test_kinds_and_overrides(tmp_path: Path) -> None:
    catalog = ModelCatalog([builtin_models_dir(), _plugins(tmp_path)])
    tensor = {e.name: e for e in catalog.entries(ModelKind.TENSOR)}
    language = {e.name: e for e in catalog.entries(ModelKind.LANGUAGE)}
    assert set(tensor) == {"decision", "picker", "broken"}
    assert set(language) == {"tinylm", "chat"}
    assert tensor["decision"].builtin and not tensor["picker"].builtin
    # An unreadable config makes a tensor entry that says why; reading it raises that.
    assert "cannot read model config" in tensor["broken"].error
    assert tensor["broken"].document is None


def test_both_services_take_one_catalogue(tmp_path: Path) -> None:
    catalog = ModelCatalog([builtin_models_dir(), _plugins(tmp_path)])
    repository = ModelRepository([OnnxLoader(threads=1)], catalog)
    generation = GenerationService(catalog, threads=1)
    assert [e.name for e in repository.entries()] == ["broken", "decision", "picker"]
    assert sorted(p.name for p in generation.discover()) == ["chat", "tinylm"]
    assert repository.catalog is catalog
    entry, _ = repository.load("broken")
    assert entry.state.name == "FAILED" and "cannot read model config" in entry.reason


def test_a_later_folder_overrides_within_its_kind(tmp_path: Path) -> None:
    plugins = tmp_path / "models"
    shutil.copytree(builtin_models_dir() / "decision", plugins / "decision")
    catalog = ModelCatalog([builtin_models_dir(), plugins])
    (decision,) = [e for e in catalog.entries(ModelKind.TENSOR) if e.name == "decision"]
    assert decision.source == plugins / "decision" and not decision.builtin


def test_an_edited_config_is_read_again_and_an_unchanged_one_is_not(tmp_path: Path) -> None:
    plugins = _plugins(tmp_path)
    catalog = ModelCatalog([plugins])
    source = plugins / "picker"
    first = catalog.entry(source)
    assert catalog.entry(source) is first  # same bytes: the cached reading
    catalog.scan()
    assert catalog.entry(source) is first
    path = source / "config.yaml"
    # Same size, same moment: a stat alone would not see this edit.
    path.write_text(path.read_text().replace('version: "1"', 'version: "2"'))
    assert catalog.entry(source).document["version"] == "2"


def test_a_folder_turned_language_model_changes_kind(tmp_path: Path) -> None:
    plugins = _plugins(tmp_path)
    catalog = ModelCatalog([plugins])
    shutil.rmtree(plugins / "picker")
    shutil.copytree(plugins / "chat", plugins / "picker")
    (plugins / "picker" / "config.yaml").write_text(
        (plugins / "picker" / "config.yaml").read_text().replace("name: chat", "name: picker")
    )
    catalog.scan()
    assert "picker" in {e.name for e in catalog.entries(ModelKind.LANGUAGE)}
    assert "picker" not in {e.name for e in catalog.entries(ModelKind.TENSOR)}
