"""The model repository extension of KServe v2 REST (as Triton serves it):

``POST /v2/repository/index``, ``POST /v2/repository/models/{name}/load`` and
``POST /v2/repository/models/{name}/unload``. Used by ``agentd models`` and tritonclient.

Load and unload take a language model's name too (the catalogue says which kind a name
is): it is (re)loaded or unloaded in the generation service, as a tensor model is in the
inference service. The index lists the tensor models (``GET /v1/models`` the others).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agentd.errors import AgentdError, Code
from agentd.gateway.asgi import Send
from agentd.gateway.protocol import clip, http_status, send_json
from agentd.gateway.redact import public_message
from agentd.inference import InferenceService, ModelState

if TYPE_CHECKING:
    from agentd.generate.service import GenerationService

__all__ = ["ModelAdmin"]

PREFIX = "/v2/repository/"


class ModelAdmin:
    def __init__(
        self, service: InferenceService, generation: GenerationService | None = None
    ) -> None:
        self._service = service
        self._generation = generation

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
            if self._generation is not None and self._generation.knows(name):
                await self._language_model(name, action, send)
                return
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

    async def _language_model(self, name: str, action: str, send: Send) -> None:
        """Load (or reload) or unload the language model ``name``: a load that fails is a
        400 with the reason (a served version keeps serving)."""
        generation = self._generation
        assert generation is not None
        if action == "unload":
            await generation.unload(name)  # NotFound when it is not served
        else:
            served = any(m.name == name for m in generation.models())
            try:
                await generation.load(name)
            except AgentdError as exc:
                if exc.code is Code.NOT_FOUND:
                    raise
                message = f"failed to load {name!r}: {public_message(exc.message)}"
                if served:
                    message += " (the previous version is still served)"
                await send_json(send, 400, {"error": message})
                return
        await send_json(send, 200, {})


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
