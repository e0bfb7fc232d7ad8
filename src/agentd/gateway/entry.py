"""The ASGI entry point Envoy (pyvoy) loads: ``agentd.gateway.entry:app``.

Envoy runs the app in its own embedded interpreter, so settings travel from the ``agentd
serve`` process through one environment variable. The real app is built at lifespan
startup, not at import.
"""

from __future__ import annotations

import logging
import os
from typing import Any

__all__ = ["SETTINGS_ENV", "app"]

SETTINGS_ENV = "AGENTD_SERVE_SETTINGS"


class _DeferredApp:
    def __init__(self) -> None:
        self._gateway: Any = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        gateway = self._gateway
        if gateway is None:
            gateway = self._gateway = _build()
        await gateway(scope, receive, send)


def _build() -> Any:
    from agentd.gateway.app import Gateway
    from agentd.settings import Settings

    raw = os.environ.get(SETTINGS_ENV)
    settings = Settings.model_validate_json(raw) if raw else Settings()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return Gateway(settings)


app = _DeferredApp()
