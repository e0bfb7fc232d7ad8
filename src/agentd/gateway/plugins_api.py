"""``GET /v1/plugins``: the loaded agent plugin files as JSON (docs/plugins.md, Status).

Each file: its agent types, version (content hash), load time and the last failure of a
reload (the previous version kept serving). With live reload off the files are those
loaded at start, never with a failure.
"""

from __future__ import annotations

from typing import Any

from agentd.gateway.asgi import Send
from agentd.gateway.protocol import send_json
from agentd.node import Node

__all__ = ["PLUGINS_PATH", "PluginsApi", "agent_plugin_rows"]

PLUGINS_PATH = "/v1/plugins"


def agent_plugin_rows(node: Node) -> list[dict[str, Any]]:
    """``{"file", "types", "version", "loaded_at", "last_failure"}`` per agent plugin file."""
    handler = node.plugins.handlers.get("agents") if node.plugins is not None else None
    status = getattr(handler, "status", None)
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


class PluginsApi:
    def __init__(self, node: Node) -> None:
        self._node = node

    async def list(self, send: Send) -> None:
        """``{"agents": [...]}`` with status 200 (computed per request: they change live)."""
        await send_json(send, 200, {"agents": agent_plugin_rows(self._node)})
