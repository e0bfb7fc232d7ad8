"""Live agent reload on a real node: the import beside the old version, the atomic swap,
the next turn on the new code with its state (and migration), rollback on every fault,
deletion, the release of old modules and memory, and the manager's debounce and filter
(a real folder watch)."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import os
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path

import pytest

from agentd.errors import Internal, NotFound
from agentd.node import Node, NodeOptions, open_node
from agentd.plugins import PluginRefused
from agentd.plugins.agents import AgentPlugins
from agentd.plugins.manager import PluginManager, kind_of
from agentd.plugins.manifest import build_manifest
from agentd.settings import Settings

TEMPLATE = """
import asyncio

from agentd import Agent

VERSION = {version!r}
GATE = None  # set by a test to hold a turn open


class Ver(Agent):
    name = "ver"
{extra}
    async def handle(self, ctx, message):
        first = VERSION
        if GATE is not None:
            await GATE.wait()
        ctx.state["n"] = ctx.state.get("n", 0) + 1
        return f"{{first}}/{{VERSION}} n={{ctx.state['n']}} from={{ctx.state.get('from')}}"
"""

MIGRATE = """
    @classmethod
    def migrate_state(cls, state, previous_version):
        return {**state, "from": (previous_version or "none")[:8]}
"""


def source(version: str, extra: str = "") -> str:
    return TEMPLATE.format(version=version, extra=extra)


def write(path: Path, text: str) -> None:
    path.write_text(textwrap.dedent(text))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "plugins" / "agents").mkdir(parents=True)
    return tmp_path / "plugins"


@pytest.fixture
async def node(folder: Path, tmp_path: Path) -> AsyncIterator[Node]:
    write(folder / "agents" / "ver.py", source("v1"))
    settings = Settings(plugins=folder, state_store="memory", reload=False)
    options = NodeOptions(generation=False, tools=False)
    async with open_node(settings, options=options) as started:
        yield started


def plugins(node: Node, check=None) -> AgentPlugins:
    return AgentPlugins(node.registry, node.settings.plugins / "agents", check=check)


async def ask(node: Node, address: str = "ver/a") -> str:
    return await node.runtime.host.ask(address, "hi", timeout=10)


def test_kind_of_ignores_editor_files_and_sorts_by_kind(tmp_path: Path) -> None:
    root = tmp_path
    assert kind_of(root, root / "agents" / "x.py") == "agents"
    assert kind_of(root, root / "tools" / "t.py") == "tools"
    assert kind_of(root, root / "models" / "m" / "1" / "model.onnx") == "models"
    assert kind_of(root, root / "MANIFEST") == "manifest"
    assert kind_of(root, root / "MANIFEST.sig") == "manifest"
    for ignored in (
        "agents/.x.py.swp",
        "agents/x.py.swp",
        "agents/x.py~",
        "agents/.#x.py",
        "agents/4913",
        "agents/.hidden.py",
        "agents/__pycache__/x.cpython-311.pyc",
        "agents/x.txt",
        "agents/sub/x.py",
        "elsewhere.py",
    ):
        assert kind_of(root, root / ignored) is None, ignored
    assert kind_of(root, tmp_path.parent / "agents" / "x.py") is None


async def test_the_next_turn_runs_the_new_code_with_its_state_migrated(node: Node) -> None:
    path = node.settings.plugins / "agents" / "ver.py"
    assert await ask(node) == "v1/v1 n=1 from=None"
    v1 = hashlib.sha256(path.read_bytes()).hexdigest()
    write(path, source("v2", MIGRATE))
    assert plugins(node).reload(path) == "ok"
    # The same instance, its state kept and migrated once (previous version: v1's hash).
    assert await ask(node) == f"v2/v2 n=2 from={v1[:8]}"
    assert await ask(node) == f"v2/v2 n=3 from={v1[:8]}"
    assert (
        node.registry.files[path.resolve()].version == hashlib.sha256(path.read_bytes()).hexdigest()
    )


async def test_a_turn_running_during_the_swap_finishes_on_its_version(node: Node) -> None:
    path = node.settings.plugins / "agents" / "ver.py"
    reloader = plugins(node)
    write(path, source("v2"))
    assert reloader.reload(path) == "ok"
    module = sys.modules[node.registry.get("ver").__module__]
    vars(module)["GATE"] = gate = asyncio.Event()
    running = asyncio.create_task(ask(node))
    await asyncio.sleep(0.05)  # the turn has started and waits at the gate
    write(path, source("v3"))
    assert reloader.reload(path) == "ok"
    gate.set()
    assert await running == "v2/v2 n=1 from=None"  # read at start and at end: one version
    assert await ask(node) == "v3/v3 n=2 from=None"


@pytest.mark.parametrize(
    ("broken", "reason"),
    [
        ("class Ver(:\n", "SyntaxError"),
        ("import agentd_no_such_module\n", "ModuleNotFoundError"),
        (
            source("v9").replace(
                "    name = ",
                "    def __init__(self):\n        raise RuntimeError('no')\n    name = ",
            ),
            "RuntimeError: no",
        ),
        ("raise SystemExit(3)\n", "SystemExit"),
        # Read between a writer's truncate and its write (CI saw 404s for 'ver' so).
        ("\n", "is empty now"),
    ],
    ids=["syntax", "import", "constructor", "system-exit", "emptied"],
)
async def test_a_bad_version_leaves_the_previous_serving_until_a_good_one(
    node: Node, broken: str, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = node.settings.plugins / "agents" / "ver.py"
    reloader = plugins(node)
    assert await ask(node) == "v1/v1 n=1 from=None"
    modules = set(sys.modules)
    path.write_text(broken)
    with caplog.at_level(logging.ERROR, logger="agentd.plugins.agents"):
        assert reloader.reload(path) == "failed"
    lines = [r.getMessage() for r in caplog.records if r.name == "agentd.plugins.agents"]
    assert len(lines) == 1 and str(path) in lines[0] and reason in lines[0]
    assert reason in reloader.last_failure[path.resolve()].reason
    assert set(sys.modules) == modules  # the failed version's module is gone
    assert await ask(node) == "v1/v1 n=2 from=None"  # still the previous version
    write(path, source("v2"))
    assert reloader.reload(path) == "ok"
    assert path.resolve() not in reloader.last_failure
    assert await ask(node) == "v2/v2 n=3 from=None"


async def test_a_file_that_never_defined_an_agent_loads(node: Node) -> None:
    """A helper module beside the plugins (no agent type) is no failure."""
    path = node.settings.plugins / "agents" / "helpers.py"
    path.write_text("GREETING = 'hi'\n")
    reloader = plugins(node)
    assert reloader.reload(path) == "ok"
    assert path.resolve() not in reloader.last_failure


async def test_a_refused_file_is_not_run(node: Node) -> None:
    path = node.settings.plugins / "agents" / "ver.py"

    def refuse(p: Path, content: bytes) -> str:
        raise PluginRefused(f"agents/{p.name}: hash mismatch")

    reloader = plugins(node, check=refuse)
    write(path, source("v2") + "\nraise SystemExit('must not run')\n")
    assert reloader.reload(path) == "refused"
    assert reloader.last_failure[path.resolve()].reason == "agents/ver.py: hash mismatch"
    assert await ask(node) == "v1/v1 n=1 from=None"


async def test_a_deleted_file_removes_its_types_after_running_turns(node: Node) -> None:
    path = node.settings.plugins / "agents" / "ver.py"
    reloader = plugins(node)
    write(path, source("v2"))
    assert reloader.reload(path) == "ok"
    module_name = node.registry.get("ver").__module__
    vars(sys.modules[module_name])["GATE"] = gate = asyncio.Event()
    running = asyncio.create_task(ask(node))
    await asyncio.sleep(0.05)
    path.unlink()
    assert reloader.reload(path) == "removed"
    assert "ver" not in node.registry and module_name not in sys.modules
    gate.set()
    assert await running == "v2/v2 n=1 from=None"  # the running turn finished
    with pytest.raises(NotFound):
        await ask(node)  # the existing instance
    with pytest.raises(NotFound):
        await ask(node, "ver/new")
    write(path, source("v3"))
    assert reloader.reload(path) == "ok"
    assert await ask(node) == "v3/v3 n=2 from=None"


async def test_deleting_a_plugin_that_overrode_a_built_in_brings_the_built_in_back(
    node: Node,
) -> None:
    builtin = node.registry.get("echo")
    path = node.settings.plugins / "agents" / "loud.py"
    write(
        path,
        """
        from agentd import Agent

        class Loud(Agent):
            name = "echo"

            async def handle(self, ctx, message):
                return {"loud": message}
        """,
    )
    reloader = plugins(node)
    assert reloader.reload(path) == "ok"
    assert await ask(node, "echo/a") == {"loud": "hi"}
    # A version that no longer defines the name gives it back too.
    write(path, "from agentd import Agent\n")
    assert reloader.reload(path) == "ok"
    assert node.registry.get("echo") is builtin
    assert await ask(node, "echo/a") == "hi"  # the built-in echo, on the same instance
    write(path, source("v9").replace('name = "ver"', 'name = "echo"'))
    assert reloader.reload(path) == "ok"
    path.unlink()
    assert reloader.reload(path) == "removed"
    assert node.registry.get("echo") is builtin and not builtin._replaced
    assert await ask(node, "echo/b") == "hi"


async def test_a_migration_that_fails_fails_the_call_and_keeps_the_state(node: Node) -> None:
    path = node.settings.plugins / "agents" / "ver.py"
    assert await ask(node) == "v1/v1 n=1 from=None"
    bad = (
        "\n    @classmethod\n    def migrate_state(cls, state, previous):"
        "\n        raise KeyError('x')\n"
    )
    write(path, source("v2", bad))
    assert plugins(node).reload(path) == "ok"
    with pytest.raises(Internal, match="could not take over: KeyError"):
        await ask(node)
    write(path, source("v3"))
    assert plugins(node).reload(path) == "ok"
    assert await ask(node) == "v3/v3 n=2 from=None"


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


async def test_reloads_release_modules_and_memory(node: Node) -> None:
    path = node.settings.plugins / "agents" / "ver.py"
    reloader = plugins(node)
    await asyncio.gather(*(ask(node, f"ver/{i}") for i in range(8)))

    async def cycles(count: int, start: int) -> None:
        for i in range(start, start + count):
            write(path, source(f"v{i}", MIGRATE))
            assert reloader.reload(path) == "ok"
            # Every instance moves to the new version (the old one is then unused).
            await asyncio.gather(*(ask(node, f"ver/{j}") for j in range(8)))

    await cycles(10, 0)
    gc.collect()
    after_10 = _rss_kib()
    await cycles(990, 10)
    gc.collect()
    after_1000 = _rss_kib()
    ours = [m for m in sys.modules if m.startswith("agentd_plugins.agents.ver")]
    assert len(ours) == 1, ours
    growth = (after_1000 - after_10) / after_10
    print(f"RSS after 10 reloads {after_10} KiB, after 1000 {after_1000} KiB ({growth:+.2%})")
    assert growth < 0.05


class Recorder:
    kind = "agents"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.batches: list[set[Path]] = []
        self.changed_event = asyncio.Event()

    def files(self) -> list[Path]:
        return []

    def changed(self, paths: Iterable[Path]) -> Mapping[Path, str]:
        paths = set(paths)
        if paths:
            self.batches.append(paths)
            self.changed_event.set()
        return dict.fromkeys(paths, "ok")

    def status(self) -> list[dict[str, object]]:
        return []

    def failures(self) -> Mapping[Path, object]:
        return {}

    async def aclose(self) -> None:
        pass


async def _settle(recorder: Recorder, quiet: float = 0.6) -> None:
    await asyncio.wait_for(recorder.changed_event.wait(), 10)
    await asyncio.sleep(quiet)  # a second batch would have come by now


async def test_a_burst_of_saves_gives_one_batch_and_temp_files_none(folder: Path) -> None:
    recorder = Recorder(folder / "agents")
    # 300 ms: ten writes 3 ms apart stay one burst even when a loaded machine stalls this
    # process between two of them (at 50 ms a stall of that length split it).
    manager = PluginManager(folder, [recorder], debounce_ms=300)
    await manager.start()
    try:
        await manager.ready()
        target = folder / "agents" / "x.py"
        for i in range(10):  # an editor saving ten times in a burst
            target.write_text(f"# save {i}\n")
            await asyncio.sleep(0.003)
        await _settle(recorder)
        assert recorder.batches == [{target.resolve()}]
        # Editor leftovers and unrelated files give nothing.
        recorder.changed_event.clear()
        for name in (".x.py.swp", "x.py~", ".#x.py", "4913", "notes.txt"):
            (folder / "agents" / name).write_text("junk")
        (folder / "agents" / "__pycache__").mkdir()
        (folder / "agents" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
        await asyncio.sleep(0.6)
        assert len(recorder.batches) == 1
        # A save by rename (write a temp file, rename it over the plugin): one batch.
        temp = folder / "agents" / ".x.py.tmp"
        temp.write_text("# renamed in\n")
        temp.rename(target)
        await _settle(recorder)
        assert recorder.batches[1:] == [{target.resolve()}]
    finally:
        await manager.aclose()


async def test_a_node_reloads_a_written_plugin(folder: Path) -> None:
    write(folder / "agents" / "ver.py", source("v1"))
    settings = Settings(plugins=folder, state_store="memory", reload_debounce_ms=20)
    async with open_node(settings, options=NodeOptions(generation=False, tools=False)) as node:
        assert node.plugins is not None
        await node.plugins.ready()
        assert await ask(node) == "v1/v1 n=1 from=None"
        write(folder / "agents" / "ver.py", source("v2"))
        deadline = time.monotonic() + 10
        while (reply := await ask(node)).startswith("v1") and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert reply.startswith("v2/v2")
        assert node.metrics is not None
        metrics = node.metrics.render()[0].decode()
        assert 'agentd_plugin_reloads_total{kind="agents",outcome="ok"} 1.0' in metrics
    # A node given its own registry (the swarm) watches nothing.
    async with open_node(
        settings,
        registry=node.registry,
        options=NodeOptions(generation=False, tools=False, metrics=False),
    ) as other:
        assert other.plugins is None


async def test_a_slow_import_does_not_stall_the_calls_being_served(folder: Path) -> None:
    write(folder / "agents" / "ver.py", source("v1"))
    settings = Settings(plugins=folder, state_store="memory", reload_debounce_ms=20)
    async with open_node(settings, options=NodeOptions(generation=False, tools=False)) as node:
        assert node.plugins is not None
        await node.plugins.ready()
        assert await ask(node) == "v1/v1 n=1 from=None"
        # An import that takes 1.5 s (a heavy dependency): it runs beside the loop.
        write(folder / "agents" / "ver.py", "import time\ntime.sleep(1.5)\n" + source("v2"))
        longest, replies = 0.0, []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            started = time.monotonic()
            replies.append(await ask(node))
            longest = max(longest, time.monotonic() - started)
            if replies[-1].startswith("v2"):
                break
            await asyncio.sleep(0.02)
        assert replies[-1].startswith("v2/v2")
        assert replies[0].startswith("v1") and len(replies) > 10  # v1 answered meanwhile
        assert longest < 1.0, f"a call waited {longest:.2f} s behind the import"


SNEAKY = """
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


async def test_plugin_code_ending_the_process_while_reloading_is_a_failed_reload(
    folder: Path,
) -> None:
    write(folder / "agents" / "ver.py", source("v1"))
    settings = Settings(plugins=folder, state_store="memory", reload_debounce_ms=20)
    async with open_node(settings, options=NodeOptions(generation=False, tools=False)) as node:
        assert node.plugins is not None
        await node.plugins.ready()
        for name, text in (("sneaky.py", SNEAKY), ("exits.py", "import sys\nsys.exit(3)\n")):
            path = (folder / "agents" / name).resolve()
            write(path, text)
            deadline = time.monotonic() + 10
            while path not in node.plugins.failures().get("agents", {}):
                assert time.monotonic() < deadline, "no failed reload recorded"
                await asyncio.sleep(0.02)
            assert "SystemExit" in node.plugins.failures()["agents"][path].reason
        assert await ask(node) == "v1/v1 n=1 from=None"  # the node serves on


async def _until(node: Node, prefix: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while not (reply := await ask(node)).startswith(prefix) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return reply


async def test_a_hash_mismatch_is_refused_until_the_manifest_follows(folder: Path) -> None:
    path = folder / "agents" / "ver.py"
    write(path, source("v1"))
    manifest = folder / "MANIFEST"
    manifest.write_bytes(build_manifest(folder).to_bytes())
    settings = Settings(plugins=folder, state_store="memory", reload_debounce_ms=20)
    async with open_node(settings, options=NodeOptions(generation=False, tools=False)) as node:
        assert node.plugins is not None
        await node.plugins.ready()
        assert await ask(node) == "v1/v1 n=1 from=None"
        handler = node.plugins.handlers["agents"]
        assert isinstance(handler, AgentPlugins)
        write(path, source("v2"))  # not what MANIFEST lists
        deadline = time.monotonic() + 10
        while path.resolve() not in handler.last_failure and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        failure = handler.last_failure[path.resolve()]
        assert failure.outcome == "refused" and "does not match MANIFEST" in failure.reason
        assert await ask(node) == "v1/v1 n=2 from=None"  # the previous version serves
        # The deployment's MANIFEST arrives after the file: the manager looks again.
        manifest.write_bytes(build_manifest(folder).to_bytes())
        assert (await _until(node, "v2")).startswith("v2/v2 n=")  # (one per poll)
        assert path.resolve() not in handler.last_failure
        assert node.metrics is not None
        metrics = node.metrics.render()[0].decode()
        assert 'agentd_plugin_reloads_total{kind="agents",outcome="refused"} 1.0' in metrics
