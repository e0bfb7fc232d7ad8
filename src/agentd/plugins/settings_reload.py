"""Live reload of the node's config file (``settings.config``; docs/configuration.md,
"Reloading settings").

A changed file is read as ``agentd serve`` read it at start: the same flags, the
environment, then the file (flags and environment still win over the file). The new
settings are compared with those serving: what can change live (:data:`LIVE`) is applied
all at once, after everything was checked; every other setting that differs from the
file as read at start is reported by name as needing a restart. A file that does not
parse or validate changes nothing: one log line with the reason, kept in
:meth:`SettingsReload.failures` until a later good write.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from agentd.deadlines import DeadlinePolicy
from agentd.errors import ConfigError
from agentd.observability.plugin_metrics import NO_METRICS, PluginObserver
from agentd.plugins.failures import ReloadFailure
from agentd.settings import Settings, reread_settings

__all__ = ["LIVE", "SettingsReload"]

log = logging.getLogger(__name__)

KIND = "settings"

# Settings applied live, without a restart. max_body_bytes: up to its value at start (the
# protocol libraries were built with that ceiling); more needs a restart.
LIVE = (
    "log_level",
    "auth_tokens",
    "default_timeout_s",
    "max_timeout_s",
    "max_body_bytes",
    "max_mailbox",
    "idle_seconds",
    "reload_debounce_ms",
)
# Not settings of the file: compared never.
_SKIP = frozenset({"config", "serve_flags"})


class _Node(Protocol):
    """What of the node it changes (agentd.node.Node; plugins/ does not import it)."""

    settings: Settings
    deadlines: DeadlinePolicy
    runtime: Any  # .host.reconfigure(...)
    plugins: Any  # the PluginManager (.debounce_ms), None while the node is built


class SettingsReload:
    """Re-reads ``node.settings.config`` when it changes and applies what it can live.

    Others holding live values (the gateway: tokens, body limit) :meth:`subscribe` and
    are called with the new settings once they apply."""

    kind = KIND

    def __init__(self, node: _Node, *, observer: PluginObserver = NO_METRICS) -> None:
        config = node.settings.config
        if config is None:
            raise ValueError("settings reload needs settings.config")
        self.path = config.resolve()
        self._node = node
        self._observer = observer
        self._subscribers: list[Callable[[Settings], None]] = []
        self._current = node.settings
        self._body_ceiling = node.settings.max_body_bytes
        # The file as read at start: what needs a restart is what differs from it. Read
        # again here (the serving settings hold what the server derived: a chosen port,
        # a resolved host, a process's own node id).
        self.version = _digest(self.path)
        try:
            self._start = reread_settings(node.settings)
        except ConfigError:  # changed since serve read it: the next write reports it
            self._start = node.settings
        self.loaded_at = time.time()
        self.applied: list[str] = []
        self.needs_restart: list[str] = []
        self.last_failure: ReloadFailure | None = None

    @property
    def settings(self) -> Settings:
        """The settings serving now (live values applied)."""
        return self._current

    def subscribe(self, apply: Callable[[Settings], None]) -> None:
        """Call ``apply(settings)`` after each change applied (on the event loop)."""
        self._subscribers.append(apply)

    def files(self) -> list[Path]:
        return [self.path]

    def changed(self, paths: Iterable[Path]) -> dict[Path, str]:
        return {path: self.reload() for path in paths if path == self.path}

    def reload(self) -> str:
        """Read the settings again and apply what changed; the outcome (ok, unchanged,
        failed)."""
        started = time.perf_counter()
        try:
            content = self.path.read_bytes()
        except OSError as exc:
            return self._failed(f"cannot read config file {self.path}: {exc.strerror}", started)
        version = hashlib.sha256(content).hexdigest()
        if version == self.version and self.last_failure is None:
            return "unchanged"
        try:
            new = reread_settings(self._current)
            live, restart = self._compare(new)
        except ConfigError as exc:
            return self._failed(exc.message, started)
        self._apply(new, live)
        self.version, self.loaded_at, self.last_failure = version, time.time(), None
        self.applied, self.needs_restart = live, restart
        seconds = time.perf_counter() - started
        self._observer.reloaded(KIND, "ok", seconds)
        line = "settings: " + (f"applied {', '.join(live)}" if live else "nothing to apply live")
        if restart:
            line += f"; needs a restart: {', '.join(restart)}"
        log.log(logging.WARNING if restart else logging.INFO, "%s (%s)", line, self.path)
        return "ok"

    def status(self) -> list[dict[str, Any]]:
        failure = self.last_failure
        return [
            {
                "file": str(self.path),
                "version": self.version,
                "loaded_at": self.loaded_at,
                "applied": list(self.applied),
                "needs_restart": list(self.needs_restart),
                "last_failure": failure.to_json() if failure else None,
            }
        ]

    def failures(self) -> dict[Path, ReloadFailure]:
        return {self.path: self.last_failure} if self.last_failure else {}

    async def aclose(self) -> None:
        """Nothing runs in the background."""

    def _compare(self, new: Settings) -> tuple[list[str], list[str]]:
        """The live settings that changed, and those changed since start that need a
        restart. ConfigError for a live value that cannot apply (nothing applies then)."""
        if not isinstance(logging.getLevelName(new.log_level.upper()), int):
            raise ConfigError(f"log_level: unknown level {new.log_level!r}")
        live = [f for f in LIVE if getattr(new, f) != getattr(self._current, f)]
        if "max_body_bytes" in live and new.max_body_bytes > self._body_ceiling:
            live.remove("max_body_bytes")
        restart = [
            name
            for name in Settings.model_fields
            if name not in _SKIP
            and (name not in LIVE or name == "max_body_bytes")
            and getattr(new, name) != getattr(self._start, name)
            and (name != "max_body_bytes" or new.max_body_bytes > self._body_ceiling)
        ]
        return live, restart

    def _apply(self, new: Settings, live: list[str]) -> None:
        node = self._node
        if "log_level" in live:
            logging.getLogger().setLevel(new.log_level.upper())
        node.deadlines.update(new.default_timeout_s, new.max_timeout_s)
        node.runtime.host.reconfigure(idle_seconds=new.idle_seconds, max_mailbox=new.max_mailbox)
        if "reload_debounce_ms" in live and node.plugins is not None:
            node.plugins.debounce_ms = new.reload_debounce_ms
        self._current = self._current.model_copy(update={f: getattr(new, f) for f in live})
        node.settings = self._current
        for apply in self._subscribers:
            try:
                apply(self._current)
            except Exception:  # a bug in one: the others still apply
                log.exception("settings: applying the new settings failed")

    def _failed(self, reason: str, started: float) -> str:
        self.last_failure = ReloadFailure.now(reason)
        log.error("settings: %s not applied (the current settings stay): %s", self.path, reason)
        self._observer.reloaded(KIND, "failed", time.perf_counter() - started)
        return "failed"


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None
