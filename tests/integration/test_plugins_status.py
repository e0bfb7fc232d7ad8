"""``GET /v1/plugins`` and ``agentd plugins status`` on a real ``agentd serve``: the loaded
agent plugin files with types, version and load time, the tools by origin file and the
models, each with its version; a broken write shows as the last failure while the previous
version serves, and ``/readyz`` stays ready but names it; the CLI's tables and JSON; auth;
reload off; serve's one-line summary of what it loaded."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agentd.agents.builtin import BUILTIN_AGENTS
from agentd.inference import DataType
from agentd.testing import RunningServer, start_server
from agentd.testing.models import write_identity_model
from tests.tools.support import PLUGINS as TOOL_PLUGINS

TOKEN = "plugins-s3cret"
AUTH = {"authorization": f"Bearer {TOKEN}"}
INVOKE = "/agentd.v1.AgentService/Invoke"

AGENT = """
from agentd import Agent


class {cls}(Agent):
    name = "{name}"

    async def handle(self, ctx, message):
        return "{answer}"
"""


def write_agent(path: Path, name: str, answer: str) -> str:
    """Write an agent plugin file; its SHA-256 (the version the server reports)."""
    source = AGENT.format(cls=name.capitalize(), name=name, answer=answer)
    path.write_text(source)
    return hashlib.sha256(source.encode()).hexdigest()


def add_tools_and_models(folder: Path) -> None:
    """A plugin tool file (the tool tests' sample: its component is in the shared cache
    that `make test` fills, so no build here) and two tensor models, one that fails."""
    (folder / "tools").mkdir()
    shutil.copy(TOOL_PLUGINS / "tools" / "sample.py", folder / "tools" / "sample.py")
    write_identity_model(folder / "models", "ident", DataType.FP32)
    broken = folder / "models" / "broken"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"not a model")


def folder_version(plugins: Path, folder: Path) -> str:
    """A model folder's version: SHA-256 of its files' ``sha256sum`` lines (MANIFEST's)."""
    lines = "".join(
        f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(plugins).as_posix()}\n"
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    )
    return hashlib.sha256(lines.encode()).hexdigest()


@pytest.fixture(scope="module")
def plugins_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("plugins")
    (folder / "agents").mkdir()
    write_agent(folder / "agents" / "greeter.py", "greeter", "hello")
    write_agent(folder / "agents" / "flaky.py", "flaky", "v1")
    add_tools_and_models(folder)
    return folder


@pytest.fixture(scope="module")
def server(plugins_dir: Path) -> Iterator[RunningServer]:
    env = {"AGENTD_RELOAD_DEBOUNCE_MS": "20", "AGENTD_AUTH_TOKENS": TOKEN}
    running = start_server(["--plugins", str(plugins_dir)], env=env, timeout=120)
    yield running
    running.stop()


def everything(server: RunningServer) -> dict[str, list[dict[str, Any]]]:
    r = httpx.get(server.url + "/v1/plugins", headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"agents", "tools", "models", "settings"}
    assert body["settings"] == []  # this server has no config file to watch
    return body


def plugins(server: RunningServer) -> dict[str, dict[str, Any]]:
    return {Path(row["file"]).name: row for row in everything(server)["agents"]}


def tools(server: RunningServer) -> dict[str, dict[str, Any]]:
    return {row["file"]: row for row in everything(server)["tools"]}


def models(server: RunningServer) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in everything(server)["models"]}


def wait_for(check: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def cli(*args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "AGENTD_TOKEN"}
    if token is not None:
        env["AGENTD_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "agentd", "plugins", "status", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "COLUMNS": "200"},
    )


def test_lists_each_agent_file_with_types_version_and_load_time(
    server: RunningServer, plugins_dir: Path
) -> None:
    started = time.time()
    rows = plugins(server)
    greeter = rows["greeter.py"]
    source = (plugins_dir / "agents" / "greeter.py").read_bytes()
    assert greeter["file"] == str((plugins_dir / "agents" / "greeter.py").resolve())
    assert greeter["types"] == ["greeter"]
    assert greeter["version"] == hashlib.sha256(source).hexdigest()
    assert started - 120 < greeter["loaded_at"] <= time.time()
    assert greeter["last_failure"] is None
    assert set(greeter) == {"file", "types", "version", "loaded_at", "last_failure"}


def test_lists_tools_by_origin_file_with_version(server: RunningServer) -> None:
    started = time.time()
    rows = tools(server)
    assert set(rows) == {"builtin", "tools/sample.py"}
    assert {"calc", "echo", "text_stats"} <= set(rows["builtin"]["tools"])
    sample = rows["tools/sample.py"]
    assert "add" in sample["tools"]
    for row in rows.values():
        assert set(row) == {"file", "tools", "version", "loaded_at", "last_failure"}
        assert len(row["version"]) >= 16 and int(row["version"], 16) >= 0
        assert started - 120 < row["loaded_at"] <= time.time()
        assert row["last_failure"] is None
    assert sample["version"] != rows["builtin"]["version"]


def test_lists_models_with_kind_folder_version_and_state(
    server: RunningServer, plugins_dir: Path
) -> None:
    rows = models(server)
    assert {"decision", "tinylm", "ident", "broken"} <= set(rows)
    ident = rows["ident"]
    assert set(ident) == {
        "name",
        "kind",
        "folder",
        "version",
        "state",
        "loaded_at",
        "last_failure",
    }
    folder = plugins_dir / "models" / "ident"
    assert ident["kind"] == "tensor" and ident["state"] == "READY"
    assert Path(ident["folder"]).resolve() == folder.resolve()
    assert ident["version"] == folder_version(plugins_dir, folder)
    assert time.time() - 120 < ident["loaded_at"] <= time.time()
    assert rows["tinylm"]["kind"] == "language-model" and rows["tinylm"]["state"] == "READY"
    assert rows["decision"]["kind"] == "tensor" and rows["decision"]["version"]
    assert rows["broken"]["state"] == "FAILED"


def test_serve_prints_what_it_loaded_in_one_line(server: RunningServer) -> None:
    body = everything(server)
    served = httpx.get(server.url + "/v1/tools", headers=AUTH, timeout=10).json()["tools"]
    tool_count = len(served)  # the tools served (a name two files define counts once)
    line = (
        f"loaded {len(BUILTIN_AGENTS) + 2} agent types (2 from plugins),"
        f" {tool_count} tools (1 plugin file),"
        f" {len(body['models'])} models ({len(body['models']) - 1} tensor, 1 language;"
        " 1 failed: broken)"
    )
    log = server.log()
    assert line in log.splitlines(), log
    # Printed with the banner, once.
    lines = log.splitlines()
    assert lines.index(line) > next(
        i for i, text in enumerate(lines) if text.startswith("agentd listening on")
    )
    assert log.count(line) == 1


def test_same_auth_and_methods_as_the_other_v1_endpoints(server: RunningServer) -> None:
    r = httpx.get(server.url + "/v1/plugins", timeout=10)
    assert r.status_code == 401
    head = httpx.head(server.url + "/v1/plugins", headers=AUTH, timeout=10)
    assert head.status_code == 200 and head.content == b""
    post = httpx.post(server.url + "/v1/plugins", headers=AUTH, json={}, timeout=10)
    assert post.status_code == 405


def test_broken_write_is_the_last_failure_and_the_old_version_serves(
    server: RunningServer, plugins_dir: Path
) -> None:
    path = plugins_dir / "agents" / "flaky.py"
    good = plugins(server)["flaky.py"]
    path.write_text("from agentd import Agent\n\nclass Broken(Agent:\n")
    row = wait_for(lambda: plugins(server)["flaky.py"]["last_failure"] and plugins(server))
    assert row, "the broken write never showed as a failure"
    flaky = row["flaky.py"]
    failure = flaky["last_failure"]
    assert failure["outcome"] == "failed"
    assert "SyntaxError" in failure["reason"]
    assert time.time() - 120 < failure["at"] <= time.time()
    # The previous version serves, and is the one reported.
    assert flaky["version"] == good["version"] and flaky["types"] == ["flaky"]
    r = httpx.post(
        server.url + INVOKE, json={"agent": "flaky/a", "message": {"text": "x"}}, headers=AUTH
    )
    assert r.status_code == 200 and r.json()["message"]["text"] == "v1"
    # Still ready (the previous version serves), and /readyz names the failing file.
    ready = httpx.get(server.url + "/readyz", timeout=10)
    assert ready.status_code == 200
    first, detail = ready.text.splitlines()
    assert first == "ready"
    assert detail.startswith("plugins failing (previous version serving): agents/flaky.py: ")
    assert "SyntaxError" in detail and "(line 3)" in detail
    # The CLI shows the failure in its table.
    shown = cli("--url", server.url)
    assert shown.returncode == 0, shown.stderr
    line = next(line for line in shown.stdout.splitlines() if line.startswith("flaky.py"))
    assert good["version"][:12] in line and "failed" in line and "SyntaxError" in line
    # A later good write recovers: the failure is gone, the new version reported.
    version = write_agent(path, "flaky", "v2")
    recovered = wait_for(lambda: plugins(server)["flaky.py"]["version"] == version)
    assert recovered, "the good write never loaded"
    assert plugins(server)["flaky.py"]["last_failure"] is None
    assert "flaky.py" not in httpx.get(server.url + "/readyz", timeout=10).text


def test_cli_table(server: RunningServer) -> None:
    done = cli("--url", server.url)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["FILE", "TYPES", "VERSION", "LOADED", "LAST", "FAILURE"]
    greeter = plugins(server)["greeter.py"]
    row = next(line for line in lines if line.startswith("greeter.py"))
    cells = row.split()
    assert cells[1] == "greeter"
    assert cells[2] == greeter["version"][:12]
    assert cells[3] == time.strftime("%Y-%m-%d", time.localtime(greeter["loaded_at"]))
    assert cells[-1] == "-"  # no failure
    # Then a table of the tools by file, and one of the models.
    assert ["FILE", "TOOLS", "VERSION", "LOADED", "LAST", "FAILURE"] in [
        line.split() for line in lines
    ]
    sample = tools(server)["tools/sample.py"]
    row = next(line for line in lines if line.startswith("tools/sample.py"))
    assert sample["version"][:12] in row and "add" in row
    assert ["NAME", "KIND", "STATE", "VERSION", "LOADED", "LAST", "FAILURE"] in [
        line.split() for line in lines
    ]
    ident = models(server)["ident"]
    cells = next(line for line in lines if line.startswith("ident ")).split()
    assert cells[:4] == ["ident", "tensor", "READY", ident["version"][:12]]


def test_cli_json_is_the_endpoints_answer(server: RunningServer) -> None:
    done = cli("--url", server.url, "--json")
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert {Path(row["file"]).name: row for row in body["agents"]}["greeter.py"] == plugins(server)[
        "greeter.py"
    ]
    assert set(body) == {"agents", "tools", "models", "settings"}
    assert {row["name"] for row in body["models"]} == set(models(server))


def test_cli_without_token_is_one_error_line(server: RunningServer) -> None:
    done = cli("--url", server.url, token=None)
    assert done.returncode == 1
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and "401" in done.stderr


def test_cli_unreachable_server_is_one_line_exit_1() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = cli("--url", f"http://127.0.0.1:{port}")
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot reach http://127.0.0.1:{port}")


def test_reload_off_lists_what_was_loaded_at_start(tmp_path: Path) -> None:
    (tmp_path / "agents").mkdir()
    version = write_agent(tmp_path / "agents" / "still.py", "still", "s")
    add_tools_and_models(tmp_path)
    ident = folder_version(tmp_path, tmp_path / "models" / "ident")
    running = start_server(
        ["--plugins", str(tmp_path)], env={"AGENTD_RELOAD": "false"}, timeout=120
    )
    try:
        (tmp_path / "agents" / "still.py").write_text("not python (")  # not watched: no failure
        time.sleep(0.3)
        rows = plugins(running)
        tool_rows = tools(running)
        model_rows = models(running)
        ready = httpx.get(running.url + "/readyz", timeout=10)
    finally:
        running.stop()
    assert rows["still.py"]["types"] == ["still"]
    assert rows["still.py"]["version"] == version
    assert rows["still.py"]["last_failure"] is None
    # Tools and models: the same rows as with live reload, never a failure.
    assert set(tool_rows) == {"builtin", "tools/sample.py"}
    assert "add" in tool_rows["tools/sample.py"]["tools"]
    assert "calc" in tool_rows["builtin"]["tools"]
    assert all(row["version"] and row["last_failure"] is None for row in tool_rows.values())
    assert model_rows["ident"]["version"] == ident
    assert model_rows["ident"]["state"] == "READY" and model_rows["ident"]["kind"] == "tensor"
    assert model_rows["tinylm"]["kind"] == "language-model"
    assert model_rows["broken"]["state"] == "FAILED"
    assert model_rows["broken"]["loaded_at"] is None
    assert all(row["last_failure"] is None for row in model_rows.values())
    assert ready.status_code == 200 and ready.text == "ready\n"
