"""open_node: the node's services built from settings, started in order, closed in reverse,
and a failed start closes what had started (real services, no server)."""

from __future__ import annotations

import pytest

from agentd.agents.message import Message
from agentd.node import Node, open_node
from agentd.settings import Settings
from tests.conftest import PLUGINS


def _settings(tmp_path, **overrides) -> Settings:
    values = {
        "plugins": PLUGINS,
        "state_path": tmp_path / "agents.db",
        "tools_cache_dir": tmp_path / "tools",  # nothing built: no sandbox to load
    }
    return Settings(**{**values, **overrides})


async def test_open_node_starts_every_service_and_closes_them(tmp_path):
    async with open_node(_settings(tmp_path)) as node:
        assert node.started
        assert node.inference.ready()
        assert node.generation.models(), "the built-in language model loaded"
        _, reply = await node.runtime.invoke("echo", Message(text="hi"))
        assert reply.text == "hi"
        assert node.runtime.host.gauges() is not None
    assert not node.started
    assert not node.inference.ready()
    assert node.generation.models() == []
    assert node.tools.unavailable_reason == "the tool service is shut down"


async def test_a_failed_start_closes_what_had_started_and_raises(tmp_path):
    # The runtime starts last: its state store cannot open a directory.
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    node = Node(_settings(tmp_path, state_path=state_dir))
    with pytest.raises(Exception) as failed:
        await node.start()
    assert "state" in str(failed.value) or "database" in str(failed.value)
    assert not node.started
    # inference, generation and tools had started: each was closed again.
    assert not node.inference.ready()
    assert node.generation.models() == []
    assert node.tools.unavailable_reason == "the tool service is shut down"
    await node.aclose()  # closing a node whose start failed is harmless


async def test_a_node_starts_once(tmp_path):
    async with open_node(_settings(tmp_path)) as node:
        with pytest.raises(RuntimeError, match="started already"):
            await node.start()


def test_building_a_node_starts_nothing(tmp_path):
    node = Node(_settings(tmp_path))
    assert not node.started
    assert not node.inference.ready()
    assert not (tmp_path / "agents.db").exists()
