"""Building and caching the component (one real build per session, see conftest)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from agentd.tools.build import COMPONENT_FILE, MANIFEST_FILE, build_tools, find_artefact
from tests.tools.support import PLUGINS, cache_dir


def test_artefact_holds_the_precompiled_component_and_manifest(artefact):
    assert (artefact.directory / COMPONENT_FILE).stat().st_size > 1_000_000
    manifest = json.loads((artefact.directory / MANIFEST_FILE).read_text())
    assert manifest["digest"] == artefact.digest == artefact.directory.name
    assert set(manifest["timings"]) == {"componentize_s", "precompile_s", "inspect_s"}
    names = {t.name for t in artefact.tools}
    assert {"calc", "text_stats", "echo", "add", "loop_forever", "read_passwd"} <= names
    assert "never_loaded" not in names


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
    assert not again.built
    assert again.artefact.directory == artefact.directory
    assert time.perf_counter() - started < 0.5


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
