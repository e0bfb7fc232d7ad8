"""The tool build runs tool code too (each file's top level, once, in componentize-py's
wasmtime). It must reach no host folder but the build's own throwaway copy of the sources."""

from __future__ import annotations

import ast
import os
import stat
import sys
from pathlib import Path

import pytest

from agentd.tools.build import build_tools
from agentd.tools.components import open_components
from tests.tools.support import LIMITS, cache_dir

# At build time, try every way out the build could offer: write a .pth into each folder
# on sys.path (what a host site-packages mounted read-write would run in every later
# Python), read host files, list folders, reach the network. The tool reports what worked.
ESCAPE = '''
import ast
import os
import socket
import sys

REPORT = {}


def _try(label, action):
    try:
        REPORT[label] = "ok: " + repr(action())[:300]
    except BaseException as exc:
        REPORT[label] = "refused: " + type(exc).__name__


def _write_pth(folder):
    with open(os.path.join(folder, "agentd_escape.pth"), "w") as handle:
        handle.write("import sys; sys.stderr.write('escaped')\\n")
    return folder


def _read(path):
    with open(path) as handle:
        return handle.read(100)


for _entry in list(sys.path):
    _try("write " + _entry, lambda entry=_entry: _write_pth(entry))
_try("read /etc/passwd", lambda: _read("/etc/passwd"))
_try("read HOST_FILE", lambda: _read("HOST_FILE"))
_try("list /", lambda: os.listdir("/"))
_try("connect", lambda: socket.create_connection(("127.0.0.1", 9), timeout=1))
_try("environ", lambda: sorted(os.environ))


def build_report() -> dict:
    """What the build-time probes found."""
    return REPORT
'''


def _fake_host(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A fake `python3` first on PATH and a fake VIRTUAL_ENV, each naming a site folder that
    componentize-py would mount if it looked at them; both must stay empty."""
    path_site = tmp_path / "path-python-site"
    venv = tmp_path / "venv"
    venv_site = venv / "lib" / "python3.11" / "site-packages"
    for folder in (path_site, venv_site):
        folder.mkdir(parents=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text(f"#!/bin/sh\necho '{path_site}'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return bin_dir, venv, venv_site


@pytest.mark.timeout(900)  # a real build: ~25 s alone, minutes on a loaded machine
def test_a_tool_file_reaches_no_host_folder_at_build_time(tmp_path, monkeypatch):
    secret = tmp_path / "host-secret.txt"
    secret.write_text("host secret")
    plugin_tools = tmp_path / "tools"
    plugin_tools.mkdir()
    (plugin_tools / "escape.py").write_text(ESCAPE.replace("HOST_FILE", str(secret)))
    bin_dir, venv, venv_site = _fake_host(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("VIRTUAL_ENV", str(venv))
    host_sites = [Path(p) for p in sys.path if p.endswith("site-packages")]

    artefact = build_tools(cache_dir(), plugin_tools).artefact

    for folder in (bin_dir.parent / "path-python-site", venv_site, *host_sites):
        assert not (folder / "agentd_escape.pth").exists(), f"the build wrote into {folder}"
    assert list((bin_dir.parent / "path-python-site").iterdir()) == []
    assert list(venv_site.iterdir()) == []
    assert not list(cache_dir().glob("**/agentd_escape.pth"))  # the scratch copy is gone
    runtime = open_components(artefact, LIMITS)
    try:
        outcome = runtime.call("build_report", "{}")
    finally:
        runtime.close()
    assert outcome.error is None, outcome.error
    report = __import__("json").loads(outcome.result_json)
    assert report["read /etc/passwd"].startswith("refused")
    assert report["read " + str(secret)].startswith("refused")
    assert report["connect"].startswith("refused")
    # Only what componentize-py sets for its interpreter, none of the host's variables.
    assert set(ast.literal_eval(report["environ"].removeprefix("ok: "))) <= {
        "PYTHONHOME",
        "PYTHONPATH",
        "PYTHONUNBUFFERED",
    }, report["environ"]
    # The folders the build mounts are its own: /0 the staged sources, /1 the empty scratch
    # site folder, and componentize-py's temporary copies of the standard library (/python),
    # its helpers (/bundled) and the generated bindings (/world). A host site folder would
    # have been /2 or later.
    writable = {
        label.removeprefix("write ")
        for label, found in report.items()
        if label.startswith("write ") and found.startswith("ok")
    }
    assert writable <= {"/0", "/1", "/python", "/bundled", "/world"}, writable


# Breaks the interpreter's import machinery at build time, so that componentize-py itself
# fails: only this file's tools are lost.
BREAKS_BUILD = """
import builtins

builtins.len = None


def never_served() -> int:
    return 1
"""


@pytest.mark.timeout(900)  # a real build: ~25 s alone, minutes on a loaded machine
def test_a_file_that_breaks_its_build_loses_only_its_own_tools(tmp_path):
    plugin_tools = tmp_path / "tools"
    plugin_tools.mkdir()
    (plugin_tools / "breaks_build.py").write_text(BREAKS_BUILD)
    (plugin_tools / "fine.py").write_text("def fine() -> str:\n    return 'fine'\n")

    artefact = build_tools(cache_dir(), plugin_tools).artefact

    names = {tool.name for tool in artefact.tools}
    assert {"calc", "fine"} <= names and "never_served" not in names
    errors = {error.file: error.message for error in artefact.load_errors}
    assert errors["tools/breaks_build.py"].startswith("the file broke the build's interpreter")
    runtime = open_components(artefact, LIMITS)
    try:
        assert runtime.call("fine", "{}").result_json == '"fine"'
        assert runtime.call("calc", '{"expression": "6*7"}').result_json == "42"
    finally:
        runtime.close()
    again = build_tools(cache_dir(), plugin_tools)  # the failure is cached like a build
    assert again.num_built == 0 and again.artefact == artefact
