"""Settings reload on a real ``agentd serve --config FILE``: a changed config file applies
what can change live (auth tokens, deadlines, log level), names what needs a restart and
keeps serving, and a file that does not parse or validate changes nothing until a good
write recovers (docs/configuration.md, "Reloading settings")."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from agentd.testing import RunningServer, start_server
from tests.conftest import PLUGINS

INVOKE = "/agentd.v1.AgentService/Invoke"


class Reloading:
    def __init__(self, server: RunningServer, config: Path, plugins: Path) -> None:
        self.server, self.config, self.plugins = server, config, plugins
        self.http = httpx.Client(base_url=server.url, timeout=30)
        self.writes = 0

    def lines(self, needle: str) -> list[str]:
        return [line for line in self.server.log().splitlines() if needle in line]

    def write(self, text: str | dict[str, Any], *, expect: str) -> str:
        """Write the config file (by rename, as editors save) and return the log line
        containing ``expect`` that the reload wrote."""
        before = len(self.lines(expect))
        content = text if isinstance(text, str) else yaml.safe_dump(text)
        self.writes += 1  # new bytes each time: the same settings are read again too
        content += f"\n# write {self.writes}\n"
        temp = self.config.with_name(".agentd.yaml.tmp")
        temp.write_text(content)
        temp.replace(self.config)
        end = time.monotonic() + 30
        while time.monotonic() < end:
            found = self.lines(expect)
            if len(found) > before:
                return found[-1]
            time.sleep(0.05)
        raise AssertionError(f"no {expect!r} line after the write:\n{self.server.log()[-3000:]}")

    def invoke(self, text: str = "x", token: str | None = None, **headers: str) -> httpx.Response:
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        return self.http.post(
            INVOKE, json={"agent": "slow/s", "message": {"text": text}}, headers=headers
        )


@pytest.fixture(scope="module")
def reloading(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reloading]:
    root = tmp_path_factory.mktemp("settings-reload")
    plugins = root / "plugins"
    shutil.copytree(PLUGINS / "agents", plugins / "agents")
    config = root / "conf" / "agentd.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump({"auth_tokens": ["old-token"]}))
    server = start_server(
        ["--config", str(config), "--plugins", str(plugins)],
        env={"AGENTD_RELOAD_DEBOUNCE_MS": "20"},
    )
    state = Reloading(server, config, plugins)
    try:
        yield state
    finally:
        state.http.close()
        server.stop()


def test_auth_tokens_change_live_and_auth_turns_off_and_on(reloading: Reloading) -> None:
    reloading.write({"auth_tokens": ["old-token"]}, expect="settings:")
    assert reloading.invoke("0", token="old-token").status_code == 200
    assert reloading.invoke("0").status_code == 401

    line = reloading.write({"auth_tokens": ["new-token"]}, expect="applied auth_tokens")
    assert "new-token" not in line and "old-token" not in line  # names, never values
    assert reloading.invoke("0", token="old-token").status_code == 401
    assert reloading.invoke("0", token="new-token").status_code == 200

    reloading.write({}, expect="applied auth_tokens")  # off
    assert reloading.invoke("0").status_code == 200
    reloading.write({"auth_tokens": ["on-again"]}, expect="applied auth_tokens")  # on
    assert reloading.invoke("0").status_code == 401
    assert reloading.invoke("0", token="on-again").status_code == 200


def test_deadlines_change_live(reloading: Reloading) -> None:
    reloading.write({"default_timeout_s": 0.3}, expect="settings: applied")
    r = reloading.invoke("3")  # no deadline of its own: the new default
    assert (r.status_code, r.json()["code"]) == (504, "deadline_exceeded")

    reloading.write({"default_timeout_s": 0.2, "max_timeout_s": 0.3}, expect="max_timeout_s (")
    r = reloading.invoke("3", **{"connect-timeout-ms": "20000"})  # cut to the new maximum
    assert (r.status_code, r.json()["code"]) == (504, "deadline_exceeded")

    reloading.write({}, expect="settings: applied")  # back to the defaults (60 s, no cap)
    assert reloading.invoke("0.5", **{"connect-timeout-ms": "20000"}).status_code == 200


def test_log_level_changes_what_is_logged(reloading: Reloading) -> None:
    agent = reloading.plugins / "agents" / "extra.py"
    source = (
        "from agentd import Agent\n\n\nclass Extra(Agent):\n    name = 'extra{n}'\n\n"
        "    async def handle(self, ctx, message):\n        return 'ok'\n"
    )

    def agent_loaded(n: int) -> bool:
        agent.write_text(source.format(n=n))
        end = time.monotonic() + 5
        while time.monotonic() < end:
            if (
                reloading.http.post(
                    INVOKE, json={"agent": f"extra{n}/a", "message": {"text": ""}}
                ).status_code
                == 200
            ):  # its type exists now
                return any(f"extra{n}" in line for line in reloading.lines("agent plugin"))
            time.sleep(0.05)
        raise AssertionError(f"extra{n} never loaded")

    # A warning-level line (something needs a restart) tells the change applied.
    reloading.write({"log_level": "warning", "workers": 7}, expect="needs a restart")
    assert not agent_loaded(1)  # its info line is not logged
    reloading.write({"log_level": "info"}, expect="applied log_level")
    assert agent_loaded(2)
    agent.unlink()


def test_a_change_that_needs_a_restart_is_named_and_the_server_serves_on(
    reloading: Reloading,
) -> None:
    # port: the --port flag wins over the file, so that one is no change at all.
    line = reloading.write(
        {"port": 1, "workers": 3, "max_queued_turns": 100}, expect="needs a restart"
    )
    assert line.split("needs a restart: ")[1].startswith("workers, max_queued_turns (")
    assert reloading.invoke("0").status_code == 200  # still serving, on its port
    (row,) = reloading.http.get("/v1/plugins").json()["settings"]  # auth is off in this file
    assert row["file"] == str(reloading.config) and row["last_failure"] is None
    assert row["needs_restart"] == ["workers", "max_queued_turns"]
    table = subprocess.run(
        [sys.executable, "-m", "agentd", "plugins", "status", "--url", reloading.server.url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert table.returncode == 0, table.stderr
    (line,) = [x for x in table.stdout.splitlines() if x.startswith("agentd.yaml")]
    assert "workers, max_queued_turns" in line
    line = reloading.write({}, expect="settings:")  # as at start again: nothing pending
    assert "needs a restart" not in line


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("auth_tokens: [unclosed\n", "is not valid YAML"),
        ("max_mailbox: -1\nauth_tokens: [changed]\n", "max_mailbox: Input should be greater"),
        ("log_level: loud\n", "unknown level 'loud'"),
        ("default_timeout_s: 30\nmax_timeout_s: 5\n", "longer than max_timeout_s"),
    ],
)
def test_a_bad_file_keeps_every_value_until_a_good_write(
    reloading: Reloading, content: str, reason: str
) -> None:
    reloading.write({"auth_tokens": ["kept"]}, expect="settings:")
    line = reloading.write(content, expect="not applied")
    assert reason in line
    assert reason in reloading.http.get("/readyz").text  # named among failed plugins
    assert reloading.invoke("0", token="kept").status_code == 200  # the old values serve
    assert reloading.invoke("0", token="changed").status_code == 401
    reloading.write({"auth_tokens": ["recovered"]}, expect="applied auth_tokens")
    assert reloading.invoke("0", token="recovered").status_code == 200
    assert reason not in reloading.http.get("/readyz").text


def test_each_process_reads_the_file_on_its_own(tmp_path: Path) -> None:
    config = tmp_path / "agentd.yaml"
    config.write_text(yaml.safe_dump({"auth_tokens": ["one"]}))
    server = start_server(
        ["--config", str(config), "--plugins", str(PLUGINS), "--processes", "2"],
        env={"AGENTD_RELOAD_DEBOUNCE_MS": "20"},
    )
    try:
        state = Reloading(server, config, PLUGINS)
        state.write({"auth_tokens": ["two"]}, expect="applied auth_tokens")
        end = time.monotonic() + 30
        while len(state.lines("applied auth_tokens")) < 2 and time.monotonic() < end:
            time.sleep(0.05)
        assert len(state.lines("applied auth_tokens")) == 2  # one line per process
        # New connections land on either process: each refuses the old token.
        for _ in range(8):
            with httpx.Client(base_url=server.url, timeout=30) as fresh:
                r = fresh.post(
                    INVOKE,
                    json={"agent": "echo", "message": {"text": "x"}},
                    headers={"authorization": "Bearer one"},
                )
                assert r.status_code == 401
        assert state.invoke("0", token="two").status_code == 200
        state.http.close()
    finally:
        server.stop()
