"""``GET /v1/plugins``: the node's agents, tools and models as JSON (docs/plugins.md, Status).

``{"agents": [...], "tools": [...], "models": [...]}``: each agent plugin file (its types),
each tool origin (``builtin`` or ``tools/x.py``, its tools) and each model, with its
version (a content hash), load time and the last failure of a reload (the previous version
kept serving). A kind with a live-reload handler reports through the handler's
``status()`` (plus what it does not watch: the built-in models); otherwise (reload off)
the rows come from the services as loaded at start, with no failure.

Also the one-line summary ``agentd serve`` prints at start (:func:`loaded_summary`), which
the gateway writes to the file named by ``AGENTD_LOADED_FILE`` once its node has started.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agentd.gateway.asgi import Scope, Send
from agentd.gateway.protocol import send_json
from agentd.node import Node

__all__ = [
    "LOADED_FILE_ENV",
    "PLUGINS_PATH",
    "PluginsApi",
    "agent_plugin_rows",
    "loaded_summary",
    "model_rows",
    "tool_rows",
]

log = logging.getLogger(__name__)

PLUGINS_PATH = "/v1/plugins"
# ``agentd serve`` names a file here; the gateway writes its start-up summary into it.
LOADED_FILE_ENV = "AGENTD_LOADED_FILE"

Row = dict[str, Any]


def _handler_status(node: Node, kind: str) -> Callable[[], list[Row]] | None:
    handler = node.plugins.handlers.get(kind) if node.plugins is not None else None
    return getattr(handler, "status", None)


def agent_plugin_rows(node: Node) -> list[Row]:
    """``{"file", "types", "version", "loaded_at", "last_failure"}`` per agent plugin file."""
    status = _handler_status(node, "agents")
    if status is not None:
        return [
            {
                "file": row["file"],
                "types": row["agents"],
                "version": row["version"],
                "loaded_at": row["loaded_at"],
                "last_failure": row["last_failure"],
            }
            for row in status()
        ]
    return [
        {
            "file": str(path),
            "types": list(loaded.names),
            "version": loaded.version,
            "loaded_at": loaded.loaded_at,
            "last_failure": None,
        }
        for path, loaded in sorted(node.registry.files.items())
    ]


class _StartRows:
    """The tool and model rows of a node without their reload handler: what it loaded at
    start. Tools: each origin's component (digest, tool names) found at construction (the
    same files the node's tool service was opened over). Models: versions hashed once per
    folder content (a model folder's files as they are: tensor models can be reloaded through
    the model admin API)."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self._started = time.time()
        self._tools = self._tool_components(node)
        self._versions: dict[Path, tuple[tuple[Any, ...], str]] = {}

    @staticmethod
    def _tool_components(node: Node) -> list[tuple[str, str, list[str]]]:
        if node.tools is None or not node.tools.list_tools():
            return []
        from agentd.tools.build import load_artefact, merge_components
        from agentd.tools.source import collect_units

        settings = node.settings
        components = []
        for unit in collect_units(settings.plugins / "tools"):
            found = load_artefact(settings.tools_cache_dir / unit.digest)
            if found is None:  # changed since the node opened its service: not what serves
                return []
            components.append(found)
        artefact = merge_components(components)
        served = {spec.name for spec in node.tools.list_tools()}
        return [
            (
                component.origin,
                component.digest,
                [
                    spec.name
                    for spec in artefact.tools
                    if spec.name in served and artefact.owner(spec.name) is component
                ],
            )
            for component in artefact.components
        ]

    def tools(self) -> list[Row]:
        return [
            {
                "file": origin,
                "tools": names,
                "version": digest,
                "loaded_at": self._started,
                "last_failure": None,
            }
            for origin, digest, names in self._tools
        ]

    def models(self) -> list[Row]:
        from agentd.models.catalog import ModelKind

        node = self._node
        rows = []
        for entry in node.inference.index():
            state = entry.state.value
            rows.append(self._model_row(entry.name, "tensor", entry.source, state))
        if node.generation is not None:
            ready = {model.name for model in node.generation.models()}
            for lm in node.models.entries(ModelKind.LANGUAGE):
                if lm.name in ready:
                    state = "READY"
                else:
                    state = "FAILED" if lm.source.name in node.generation.failed else "UNAVAILABLE"
                rows.append(self._model_row(lm.name, "language-model", lm.source, state))
        return rows

    def _model_row(self, name: str, kind: str, folder: Path, state: str) -> Row:
        ready = state == "READY"
        return {
            "name": name,
            "kind": kind,
            "folder": str(folder),
            "version": self._folder_version(folder),
            "state": state,
            "loaded_at": self._started if ready else None,
            "last_failure": None,
        }

    def _folder_version(self, folder: Path) -> str | None:
        """The folder's :func:`~agentd.plugins.models.folder_version` (what the model reload
        handler reports, as the verifier's ``check_folder`` computes it); hashed again only
        when a file's size or modification time changed."""
        from agentd.plugins.models import folder_version

        try:
            files = sorted(
                p
                for p in folder.rglob("*")
                if p.is_file() and "__pycache__" not in p.relative_to(folder).parts
            )
            stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
        except OSError:
            return None
        cached = self._versions.get(folder)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            version = folder_version(folder)
        except OSError:
            return None
        self._versions[folder] = (stamp, version)
        return version


def tool_rows(node: Node, start: _StartRows) -> list[Row]:
    """``{"file", "tools", "version", "loaded_at", "last_failure"}`` per tool origin."""
    status = _handler_status(node, "tools")
    if status is None:
        return start.tools()
    rows = status()
    handled = {row["file"] for row in rows}
    return rows + [row for row in start.tools() if row["file"] not in handled]


def model_rows(node: Node, start: _StartRows) -> list[Row]:
    """``{"name", "kind", "folder", "version", "state", "loaded_at", "last_failure"}`` per
    model (tensor and language)."""
    status = _handler_status(node, "models")
    if status is None:
        return start.models()
    rows = status()
    # The handler watches plugins/models only: the built-in models come from the services.
    handled = {row["name"] for row in rows}
    return rows + [row for row in start.models() if row["name"] not in handled]


def loaded_summary(node: Node, body: dict[str, list[Row]]) -> str:
    """One line naming what the node loaded, e.g. ``loaded 6 agent types (2 from plugins),
    9 tools (1 plugin file), 4 models (3 tensor, 1 language; 1 failed: broken)``."""
    types = len(node.registry.names())
    from_plugins = sum(len(row["types"]) for row in body["agents"])
    # The tools served (a name two files define counts once).
    tools = len(node.tools.list_tools()) if node.tools is not None else 0
    tool_files = sum(1 for row in body["tools"] if row["file"] != "builtin")
    models = body["models"]
    tensor = sum(1 for row in models if row["kind"] == "tensor")
    failed = sorted(
        row["name"] for row in models if row["state"] == "FAILED" or row["last_failure"]
    )
    parts = [
        f"loaded {_count(types, 'agent type')} ({from_plugins} from plugins)",
        f"{_count(tools, 'tool')} ({_count(tool_files, 'plugin file')})",
    ]
    detail = f"{tensor} tensor, {len(models) - tensor} language"
    if failed:
        detail += f"; {len(failed)} failed: {', '.join(failed)}"
    parts.append(f"{_count(len(models), 'model')} ({detail})")
    if node.tools is not None and (why := node.tools.unavailable_reason) is not None:
        parts[1] = f"no tools ({why})"
    return ", ".join(parts)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


class PluginsApi:
    def __init__(self, node: Node) -> None:
        self._node = node
        self._start = _StartRows(node)

    def body(self) -> dict[str, list[Row]]:
        node = self._node
        return {
            "agents": agent_plugin_rows(node),
            "tools": tool_rows(node, self._start),
            "models": model_rows(node, self._start),
            # The config file's row, when the node watches one (applied / needs_restart).
            "settings": (status() if (status := _handler_status(node, "settings")) else []),
        }

    async def list(self, send: Send, scope: Scope) -> None:
        """The body with status 200 (computed per request: they change live)."""
        await send_json(send, 200, self.body())

    def write_summary(self) -> None:
        """Write :func:`loaded_summary` to the file ``AGENTD_LOADED_FILE`` names (none:
        nothing); ``agentd serve`` prints it beside its banner. Never raises: the summary
        is not worth failing a start over."""
        path = os.environ.get(LOADED_FILE_ENV)
        if not path:
            return
        try:
            # From the services, as they started: the reload handlers' first look at the
            # folder may already be under way (a model that failed shows as loading again).
            start = self._start
            body = {
                "agents": agent_plugin_rows(self._node),
                "tools": start.tools(),
                "models": start.models(),
            }
            text = loaded_summary(self._node, body)
            partial = f"{path}.partial"
            with open(partial, "w", encoding="utf-8") as file:
                file.write(text + "\n")
            os.replace(partial, path)  # whole or absent: serve may read it at any moment
        except Exception:
            log.exception("could not write the start-up summary")
