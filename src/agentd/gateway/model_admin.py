"""The model repository extension of KServe v2 REST (as Triton serves it):

``POST /v2/repository/index``, ``POST /v2/repository/models/{name}/load`` and
``POST /v2/repository/models/{name}/unload``. Used by ``agentd models`` and tritonclient.
"""

from __future__ import annotations

from typing import Any

from agentd.errors import AgentdError, Code
from agentd.gateway.asgi import Send
from agentd.gateway.protocol import clip, http_status, send_json
from agentd.gateway.redact import public_message
from agentd.inference import InferenceService, ModelState

__all__ = ["ModelAdmin"]

PREFIX = "/v2/repository/"


class ModelAdmin:
    def __init__(self, service: InferenceService) -> None:
        self._service = service

    @staticmethod
    def label(path: str) -> str | None:
        """The metrics label for ``path``, or None when it is not an admin route."""
        if not path.startswith(PREFIX):
            return None
        if path == PREFIX + "index":
            return path
        target = _model_action(path)
        return None if target is None else f"{PREFIX}models/{{name}}/{target[1]}"

    async def handle(self, scope: dict[str, Any], send: Send) -> None:
        path: str = scope["path"]
        if scope["method"] != "POST":
            await send_json(
                send, 405, {"error": f"use POST for {clip(path)}"}, [(b"allow", b"POST")]
            )
            return
        try:
            if path == PREFIX + "index":
                body = [
                    {
                        "name": e.name,
                        "version": e.config.version if e.config else "1",
                        "state": e.state.value,
                        "reason": public_message(e.reason),
                    }
                    for e in self._service.index()
                ]
                await send_json(send, 200, body)
                return
            name, action = _model_action(path)  # type: ignore[misc]  # label() matched it
            if action == "load":
                entry = await self._service.load(name)
                if entry.load_error:
                    # The log has the full text (with the model's files); the client, not.
                    message = f"failed to load {name!r}: {public_message(entry.load_error)}"
                    if entry.state is ModelState.READY:
                        message += " (the previous version is still served)"
                    await send_json(send, 400, {"error": message})
                    return
            else:
                await self._service.unload(name)
            await send_json(send, 200, {})
        except AgentdError as exc:
            status = 404 if exc.code is Code.NOT_FOUND else http_status(exc.code)
            await send_json(send, status, {"error": public_message(exc.message)})


def _model_action(path: str) -> tuple[str, str] | None:
    """``(name, "load" | "unload")`` for ``/v2/repository/models/{name}/{action}`` with a
    non-empty name, else None."""
    rest = path.removeprefix(PREFIX + "models/")
    if rest == path:
        return None
    name, _, action = rest.rpartition("/")
    if not name or action not in ("load", "unload"):
        return None
    return name, action
