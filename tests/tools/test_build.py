"""Building and caching the component (one real build per session, see conftest)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from agentd.tools.build import COMPONENT_FILE, MANIFEST_FILE, build_tools, find_artefact
from tests.tools.support import PLUGINS, cache_dir


def test_each_origin_is_a_component_with_its_manifest(artefact):
    origins = [component.origin for component in artefact.components]
    assert origins == [
        "builtin",
        "tools/broken.py",
        "tools/hostile.py",
        "tools/sample.py",
        "tools/shadow.py",
    ]
    for component in artefact.components:
        assert (component.directory / COMPONENT_FILE).stat().st_size > 1_000_000
        manifest = json.loads((component.directory / MANIFEST_FILE).read_text())
        assert manifest["digest"] == component.digest == component.directory.name
        assert manifest["origin"] == component.origin
        assert set(manifest["timings"]) == {"componentize_s", "precompile_s", "inspect_s"}
    names = {t.name for t in artefact.tools}
    assert {"calc", "text_stats", "echo", "add", "loop_forever", "read_passwd"} <= names
    assert "never_loaded" not in names
    assert artefact.owner("calc").origin == "builtin"
    assert artefact.owner("add").origin == "tools/sample.py"  # shadow.py's add is refused
    assert artefact.owner("read_passwd").origin == "tools/hostile.py"


def test_tools_carry_description_and_parameter_schema(artefact):
    add = next(t for t in artefact.tools if t.name == "add")
    assert add.description == "Add two integers."
    assert add.parameters == {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer", "default": 1}},
        "required": ["a"],
        "additionalProperties": False,
    }
    options = next(t for t in artefact.tools if t.name == "options")
    assert options.parameters["additionalProperties"] is True


def test_files_that_fail_to_load_are_reported_not_fatal(artefact):
    errors = {e.file: e.message for e in artefact.load_errors}
    assert errors["tools/broken.py"] == (
        "ModuleNotFoundError: No module named 'module_that_does_not_exist'"
    )
    assert "already defined in tools/sample.py" in errors["tools/shadow.py"]


def test_rebuild_of_unchanged_files_costs_nothing(artefact, tmp_path_factory):
    started = time.perf_counter()
    again = build_tools(cache_dir(tmp_path_factory), PLUGINS / "tools")
    assert not again.built and again.num_built == 0
    assert again.artefact == artefact
    assert time.perf_counter() - started < 0.5


@pytest.mark.timeout(900)  # a real build: ~25 s alone, minutes on a loaded machine
def test_an_edited_file_rebuilds_only_its_own_component(tmp_path):
    plugins = tmp_path / "tools"
    plugins.mkdir()
    (plugins / "steady.py").write_text("def steady() -> int:\n    return 1\n")
    first = build_tools(cache_dir(), plugins).artefact  # steady.py: cached after a first run
    (plugins / "edited.py").write_text(f"def edited() -> str:\n    return {str(tmp_path)!r}\n")
    second = build_tools(cache_dir(), plugins)
    assert second.num_built == 1
    assert second.artefact.owner("steady") == first.owner("steady")
    assert second.artefact.owner("edited").origin == "tools/edited.py"


def test_changed_files_need_a_new_build(artefact, tmp_path_factory, tmp_path):
    (tmp_path / "new.py").write_text("def new(): return 1\n")
    assert find_artefact(cache_dir(tmp_path_factory), PLUGINS / "tools") == artefact
    assert find_artefact(cache_dir(tmp_path_factory), tmp_path) is None


def test_cli_build_reports_the_cached_artefact(artefact, tmp_path_factory):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "agentd",
            "tools",
            "build",
            "--plugins",
            str(PLUGINS),
            "--cache-dir",
            str(cache_dir(tmp_path_factory)),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["built"] is False
    assert report["digest"] == artefact.digest
    assert any(t["name"] == "calc" for t in report["tools"])
