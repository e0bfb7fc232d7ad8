"""Agent plugin files that end their import with SystemExit, KeyboardInterrupt or another
BaseException: the server still starts, logs and skips each of them, and serves the good
ones. And the start-up output names the plugin folder in use, as an absolute path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import httpx

from agentd.agents import AgentRegistry
from agentd.testing import RunningServer, start_server

GOOD = textwrap.dedent(
    """
    from agentd import Agent

    class Good(Agent):
        name = "good"

        async def handle(self, ctx, message):
            return "still here"
    """
)

HOSTILE = {
    "exits.py": "import sys\nsys.exit(3)\n",
    "interrupts.py": "raise KeyboardInterrupt\n",
    "generator_exit.py": "raise GeneratorExit\n",
    "own_base.py": "class Escape(BaseException):\n    pass\n\nraise Escape('out')\n",
    # Imports fine, then the class's name attribute ends the process when registered.
    "exits_at_register.py": textwrap.dedent(
        """
        import sys
        from agentd import Agent

        class Meta(type(Agent)):
            @property
            def name(cls):
                sys.exit(4)

        class Sneaky(Agent, metaclass=Meta):
            async def handle(self, ctx, message):
                return "never"
        """
    ),
}


def wait_for_line(server: RunningServer, text: str, timeout: float = 10.0) -> str:
    """The server's output once it holds ``text`` (the banner may still be arriving)."""
    end = time.monotonic() + timeout
    while text not in server.log() and time.monotonic() < end:
        time.sleep(0.05)
    return server.log()


def invoke(url: str, agent: str) -> httpx.Response:
    return httpx.post(
        url + "/agentd.v1.AgentService/Invoke",
        json={"agent": agent, "message": {"text": "hi"}},
        timeout=30,
    )


def test_plugins_ending_their_import_with_base_exceptions_are_skipped(tmp_path):
    agents = tmp_path / "plugins" / "agents"
    agents.mkdir(parents=True)
    (agents / "good.py").write_text(GOOD)
    for name, source in HOSTILE.items():
        (agents / name).write_text(source)

    server = start_server(["--plugins", str(tmp_path / "plugins")])
    try:
        reply = invoke(server.url, "good/1")
        assert reply.status_code == 200, reply.text
        assert reply.json()["message"]["text"] == "still here"
        assert invoke(server.url, "echo/1").status_code == 200  # the built-ins too
        log = wait_for_line(server, "plugin folder: ")
        for name in HOSTILE:
            assert f"agent plugin {agents / name} failed to load; skipped" in log, log
        assert "SystemExit" in log and "KeyboardInterrupt" in log and "Escape: out" in log
        assert f"plugin folder: {tmp_path / 'plugins'}" in log
    finally:
        server.stop()


def test_start_output_says_when_the_default_plugin_folder_is_missing(tmp_path):
    # The default ./plugins, relative to where serve starts: absent, that is no error.
    here = tmp_path / "here"
    here.mkdir()
    server = start_server(wrapper=["sh", "-c", f'cd "{here}" && exec "$0" "$@"'])
    try:
        line = (
            f"plugin folder: {here / 'plugins'} (does not exist: built-in agents, models"
            " and tools only)"
        )
        assert line in wait_for_line(server, line), server.log()
    finally:
        server.stop()


def serve_exit(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "AGENTD_PLUGINS"}
    return subprocess.run(
        [sys.executable, "-m", "agentd", "serve", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, "COLUMNS": "250", **(env or {})},
    )


def test_a_plugin_folder_given_that_does_not_exist_is_an_error(tmp_path):
    missing = tmp_path / "nowhere"
    config = tmp_path / "agentd.yaml"
    config.write_text(f"plugins: {missing}\n")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    cases = [
        ((["--plugins", str(missing)], None), f"--plugins: {missing} does not exist"),
        (
            ([], {"AGENTD_PLUGINS": str(missing)}),
            f"plugins (config file or AGENTD_PLUGINS): {missing} does not exist",
        ),
        (
            (["--config", str(config)], None),
            f"plugins (config file or AGENTD_PLUGINS): {missing} does not exist",
        ),
        ((["--plugins", str(a_file)], None), f"--plugins: {a_file} is not a directory"),
    ]
    for (args, env), message in cases:
        done = serve_exit(*args, env=env)
        assert done.returncode == 2, (args, env, done.stdout, done.stderr)
        output = (done.stdout + done.stderr).splitlines()
        assert output == [f"error: {message}"], (args, env, output)


def test_a_file_failing_while_registering_leaves_none_of_its_types(tmp_path, caplog):
    (tmp_path / "half.py").write_text(
        textwrap.dedent(
            """
            import sys
            from agentd import Agent

            class First(Agent):
                name = "first"

            class Meta(type(Agent)):
                @property
                def name(cls):
                    raise KeyboardInterrupt

            class Second(Agent, metaclass=Meta):
                pass
            """
        )
    )
    (tmp_path / "ok.py").write_text(GOOD)
    registry = AgentRegistry()
    assert registry.load_directory(tmp_path) == ["good"]
    assert registry.names() == ["good"]  # not "first": the file is skipped as a whole
    assert "half.py failed to load; skipped" in caplog.text
    assert "agentd_plugins.agents.half" not in sys.modules
