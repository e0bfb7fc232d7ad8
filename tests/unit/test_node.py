"""open_node: the node's services built from settings, started in order, closed in reverse,
and a failed start closes what had started (real services, no server)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from agentd.agents.message import Message
from agentd.errors import Unimplemented
from agentd.node import Node, NodeOptions, open_node
from agentd.runtime import ActorHost
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


# -- NodeOptions: a chosen host class and options, services left out ----------------------


class _RecordingHost(ActorHost):
    """An ActorHost that remembers the keyword arguments the node built it with."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.built_with = kwargs
        super().__init__(*args, **kwargs)


class _Turns:
    def __init__(self) -> None:
        self.finished: list[tuple[str, str]] = []

    def turn_finished(self, agent_type: str, outcome: str, seconds: float) -> None:
        self.finished.append((agent_type, outcome))


async def test_a_node_builds_the_host_type_it_is_given_with_its_options(tmp_path):
    turns = _Turns()
    options = NodeOptions(
        host_type=_RecordingHost, host_options={"observer": turns, "observe_every": 8}
    )
    settings = _settings(tmp_path, max_mailbox=7, idle_seconds=42.0)
    async with open_node(settings, options=options) as node:
        host = node.runtime.host
        assert type(host) is _RecordingHost
        # The options win over what the node derives; the rest still comes from settings.
        assert host.built_with["observer"] is turns
        assert host.built_with["observe_every"] == 8
        assert host.built_with["max_mailbox"] == 7
        assert host.built_with["idle_seconds"] == 42.0
        assert host.inference is node.inference
        _, reply = await node.runtime.invoke("echo", Message(text="hi"))
        assert reply.text == "hi"
        assert turns.finished == [("echo", "ok")]  # the given observer saw the turn


async def test_a_node_without_generation_and_tools_neither_builds_nor_starts_them(tmp_path):
    options = NodeOptions(generation=False, tools=False)
    async with open_node(_settings(tmp_path), options=options) as node:
        assert node.generation is None and node.tools is None
        assert node.runtime.host.generation is None and node.runtime.host.tools is None
        assert node.inference.ready()
        _, reply = await node.runtime.invoke("echo", Message(text="hi"))
        assert reply.text == "hi"
        # An agent that needs a language model hears that this node has none.
        with pytest.raises(Unimplemented, match="no language models"):
            await node.runtime.invoke("chat", Message(text="hi"))
    assert not node.started
    assert not node.inference.ready()


async def test_a_node_can_leave_out_one_service(tmp_path):
    async with open_node(_settings(tmp_path), options=NodeOptions(tools=False)) as node:
        assert node.tools is None
        assert node.generation is not None and node.generation.models()
    assert node.generation.models() == []  # closed with the node


async def test_a_node_without_metrics_builds_no_registry_and_still_serves(tmp_path):
    options = NodeOptions(metrics=False, generation=False, tools=False)
    async with open_node(_settings(tmp_path), options=options) as node:
        assert node.metrics is None
        assert node.runtime.host.gauges() is not None
        _, reply = await node.runtime.invoke("echo", Message(text="hi"))
        assert reply.text == "hi"
        features = np.zeros((1, 16), dtype=np.float32)
        outputs = await node.inference.infer("decision", {"features": features})
        assert outputs["action"].shape == (1,)


def test_language_models_need_the_metrics():
    with pytest.raises(ValueError, match="needs its metrics"):
        NodeOptions(metrics=False)
    NodeOptions(metrics=False, generation=False)  # fine
