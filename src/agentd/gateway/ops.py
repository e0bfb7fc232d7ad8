"""Operational HTTP routes: ``/healthz``, ``/readyz``, ``/metrics`` and an index at ``/``.

``/readyz`` answers ``ready`` on its first line (what probes read). A plugin whose last
reload failed does not make the node unready (its previous version serves), but a second
line names each one: ``plugins failing (previous version serving): agents/x.py: ...``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import orjson

from agentd import __version__
from agentd.gateway.asgi import Scope, Send
from agentd.gateway.health import HealthState
from agentd.gateway.protocol import header, send_body
from agentd.observability import Metrics
from agentd.plugins.failures import ReloadFailure

__all__ = ["OPEN_PATHS", "OpsRoutes"]

# Probes must work without credentials (load balancers and kubelets send none).
OPEN_PATHS = frozenset({"/healthz", "/readyz"})

# The plugins whose last load failed, by kind then path (PluginManager.failures).
PluginFailures = Callable[[], Mapping[str, Mapping[Path, ReloadFailure]]]


class OpsRoutes:
    def __init__(
        self,
        health: HealthState,
        metrics: Metrics,
        services: list[str],
        *,
        plugin_failures: PluginFailures | None = None,
        plugin_folder: Path | None = None,
    ) -> None:
        self._health = health
        self._plugin_failures = plugin_failures
        self._plugin_folder = plugin_folder
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

    async def _root(self, send: Send, scope: Scope) -> None:
        await send_body(send, 200, self._index, b"application/json")

    async def _healthz(self, send: Send, scope: Scope) -> None:
        await send_body(send, 200, b"ok\n", b"text/plain; charset=utf-8")

    async def _readyz(self, send: Send, scope: Scope) -> None:
        reason = self._health.not_ready_reason()
        if reason is None:
            body = b"ready\n"
            if self._plugin_failures is not None and (failing := self._plugin_failures()):
                body += self._failing_line(failing).encode()
            await send_body(send, 200, body, b"text/plain; charset=utf-8")
        else:
            body = f"not ready: {reason}\n".encode()
            await send_body(send, 503, body, b"text/plain; charset=utf-8")

    def _failing_line(self, failing: Mapping[str, Mapping[Path, ReloadFailure]]) -> str:
        named = [
            f"{self._name(path)}: {failure.reason}"
            for failures in failing.values()
            for path, failure in sorted(failures.items())
        ]
        # One line: a reason is one line already (describe()), newlines taken out anyway.
        text = "; ".join(" ".join(item.split()) for item in named)
        return f"plugins failing (previous version serving): {text}\n"

    def _name(self, path: Path) -> str:
        """``path`` relative to the plugin folder (``agents/x.py``) when it is inside it."""
        if self._plugin_folder is not None:
            try:
                return path.resolve().relative_to(self._plugin_folder).as_posix()
            except (ValueError, OSError):
                pass
        return str(path)

    async def _metrics_route(self, send: Send, scope: Scope) -> None:
        # OpenMetrics (with exemplars) when the scraper's Accept header asks for it.
        accept = header(scope, b"accept")
        body, content_type = self._metrics.render(accept.decode("latin-1") if accept else None)
        await send_body(send, 200, body, content_type.encode())
