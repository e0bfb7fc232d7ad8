from pathlib import Path

import pytest

from agentd import Agent
from agentd.agents import AgentRegistry
from agentd.errors import InvalidArgument, NotFound

PLUGINS = Path(__file__).parents[2] / "plugins" / "agents"


def test_register_and_get():
    class A(Agent):
        name = "a"

    registry = AgentRegistry()
    registry.register(A)
    assert registry.get("a") is A
    assert "a" in registry
    with pytest.raises(NotFound):
        registry.get("b")


def test_register_rejects_bad_names():
    class Nameless(Agent):
        pass

    with pytest.raises(InvalidArgument):
        AgentRegistry().register(Nameless)


def test_load_directory_skips_broken_files(caplog):
    registry = AgentRegistry()
    loaded = registry.load_directory(PLUGINS)
    assert sorted(loaded) == ["boom", "counter", "slow", "ticker"]
    assert "broken.py failed to load" in caplog.text


def test_load_missing_directory_is_empty(tmp_path):
    assert AgentRegistry().load_directory(tmp_path / "absent") == []


def test_streams_natively():
    from agentd.agents.builtin import Echo

    class Plain(Agent):
        name = "plain"

    assert Echo.streams_natively()
    assert not Plain.streams_natively()


def test_a_plugin_replacing_a_builtin_is_logged(tmp_path, caplog):
    from agentd.agents.builtin import Echo

    (tmp_path / "mine.py").write_text(
        "from agentd import Agent\n\n"
        "class MyEcho(Agent):\n"
        "    name = 'echo'\n\n"
        "    async def handle(self, ctx, message):\n"
        "        return 'mine'\n"
    )
    registry = AgentRegistry()
    registry.register(Echo)
    assert registry.load_directory(tmp_path) == ["echo"]
    assert registry.get("echo").__qualname__ == "MyEcho"
    assert "MyEcho replaces the agent type 'echo'" in caplog.text
    assert "Echo" in caplog.text
