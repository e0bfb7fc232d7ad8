"""Operational HTTP routes: ``/healthz``, ``/readyz``, ``/metrics`` and an index at ``/``."""

from __future__ import annotations

import orjson

from agentd import __version__
from agentd.gateway.asgi import Scope, Send
from agentd.gateway.health import HealthState
from agentd.gateway.protocol import header, send_body
from agentd.observability import Metrics

__all__ = ["OPEN_PATHS", "OpsRoutes"]

# Probes must work without credentials (load balancers and kubelets send none).
OPEN_PATHS = frozenset({"/healthz", "/readyz"})


class OpsRoutes:
    def __init__(self, health: HealthState, metrics: Metrics, services: list[str]) -> None:
        self._health = health
        self._metrics = metrics
        self._index = orjson.dumps(
            {
                "name": "agentd",
                "version": __version__,
                "services": services,
                "endpoints": ["/healthz", "/readyz", "/metrics"],
            }
        )
        self.routes = {
            "/": self._root,
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/metrics": self._metrics_route,
        }

    async def _root(self, send: Send) -> None:
        await send_body(send, 200, self._index, b"application/json")

    async def _healthz(self, send: Send) -> None:
        await send_body(send, 200, b"ok\n", b"text/plain; charset=utf-8")

    async def _readyz(self, send: Send) -> None:
        reason = self._health.not_ready_reason()
        if reason is None:
            await send_body(send, 200, b"ready\n", b"text/plain; charset=utf-8")
        else:
            body = f"not ready: {reason}\n".encode()
            await send_body(send, 503, body, b"text/plain; charset=utf-8")

    async def _metrics_route(self, send: Send, scope: Scope) -> None:
        # OpenMetrics (with exemplars) when the scraper's Accept header asks for it.
        accept = header(scope, b"accept")
        body, content_type = self._metrics.render(accept.decode("latin-1") if accept else None)
        await send_body(send, 200, body, content_type.encode())

    _metrics_route.takes_scope = True  # type: ignore[attr-defined]  # GetOnly passes the scope
