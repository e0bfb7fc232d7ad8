"""``GET /v1/plugins`` and ``agentd plugins status`` on a real ``agentd serve``: the loaded
agent plugin files with types, version and load time; a broken write shows as the last
failure while the previous version serves; the CLI's table and JSON; auth; reload off."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agentd.testing import RunningServer, start_server

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


@pytest.fixture(scope="module")
def plugins_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("plugins")
    (folder / "agents").mkdir()
    write_agent(folder / "agents" / "greeter.py", "greeter", "hello")
    write_agent(folder / "agents" / "flaky.py", "flaky", "v1")
    return folder


@pytest.fixture(scope="module")
def server(plugins_dir: Path) -> Iterator[RunningServer]:
    env = {"AGENTD_RELOAD_DEBOUNCE_MS": "20", "AGENTD_AUTH_TOKENS": TOKEN}
    running = start_server(["--plugins", str(plugins_dir)], env=env)
    yield running
    running.stop()


def plugins(server: RunningServer) -> dict[str, dict[str, Any]]:
    r = httpx.get(server.url + "/v1/plugins", headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    return {Path(row["file"]).name: row for row in r.json()["agents"]}


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


def test_cli_json_is_the_endpoints_answer(server: RunningServer) -> None:
    done = cli("--url", server.url, "--json")
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert {Path(row["file"]).name: row for row in body["agents"]}["greeter.py"] == plugins(server)[
        "greeter.py"
    ]


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


def test_reload_off_lists_the_files_loaded_at_start(tmp_path: Path) -> None:
    (tmp_path / "agents").mkdir()
    version = write_agent(tmp_path / "agents" / "still.py", "still", "s")
    running = start_server(["--plugins", str(tmp_path)], env={"AGENTD_RELOAD": "false"})
    try:
        (tmp_path / "agents" / "still.py").write_text("not python (")  # not watched: no failure
        time.sleep(0.3)
        rows = plugins(running)
    finally:
        running.stop()
    assert rows["still.py"]["types"] == ["still"]
    assert rows["still.py"]["version"] == version
    assert rows["still.py"]["last_failure"] is None
