"""``GET /v1/tools``: the sandboxed tools as JSON (name, description, parameter schema).

Calls go through ``agentd.v1.AgentService/CallTool`` (gRPC, gRPC-Web, Connect JSON).
"""

from __future__ import annotations

from typing import Any

from agentd.gateway.asgi import Scope, Send
from agentd.gateway.protocol import send_json
from agentd.tools.service import ToolService

__all__ = ["TOOLS_PATH", "ToolsApi"]

TOOLS_PATH = "/v1/tools"


class ToolsApi:
    def __init__(self, service: ToolService) -> None:
        self._service = service

    async def list(self, send: Send, scope: Scope) -> None:
        """``{"tools": [...], "available": bool, "reason"?: str}`` with status 200."""
        body: dict[str, Any] = {
            "tools": [spec.to_json() for spec in self._service.list_tools()],
            "available": self._service.available,
        }
        if (reason := self._service.unavailable_reason) is not None:
            body["reason"] = reason
        await send_json(send, 200, body)
