"""The plugin manager: watches the plugin folder and hands changed files to their kind's
handler (docs/plugins.md, "Live reload").

Changes are debounced: a batch is handed on once the folder has been quiet for
``debounce_ms`` (an editor saving ten times in a burst gives one reload, and a file still
being written is not read half-way). Editor temp files (``.swp``, ``~``, ``.#*``, vim's
``4913``, hidden files) and bytecode caches are ignored. A handler is told which of its
files changed, not how: it reads each one (gone: removed) and skips content it already
serves, so a write, a rename onto the file and a save repeated all end the same way.

Kinds: ``agents`` (``agents/*.py``), ``tools/*.py``, ``models/<name>/...`` and
``settings``: the node's config file (``settings.config``), wherever it lives, watched in
its own folder (not recursively) for that one name, so an editor's save by rename onto it
is seen too. A change nobody handles is ignored. A change
to ``MANIFEST`` or ``MANIFEST.sig`` asks every handler to look at all its files again (a
file refused before may verify now).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import watchfiles

from agentd.plugins.failures import ReloadFailure

__all__ = ["PluginHandler", "PluginManager", "kind_of"]

log = logging.getLogger(__name__)
# watchfiles logs "N changes detected" at INFO for every batch: the reload's own line says
# what happened.
logging.getLogger("watchfiles").setLevel(logging.WARNING)

# Names editors write beside the file they save: swap and backup files, lock files,
# vim's write test (4913) and anything hidden.
_IGNORED = re.compile(r"(^\.|~$|\.sw[a-p]$|^4913$|\.py[co]$|\.tmp$)")
_MANIFEST_FILES = frozenset({"MANIFEST", "MANIFEST.sig"})
# How often (ms) the rust watcher looks for events (and for a stop): it hands them on once
# one such step brought nothing new; the quiet period itself is timed here (``_flush``).
# Shorter steps answer sooner and cost more while idle (a GIL round per step): 10 ms, about
# 7 ms of CPU per second; 25 ms, about 3.
_STEP_MS = 25


class PluginHandler(Protocol):
    """Reloads one kind of plugin."""

    kind: str

    def files(self) -> list[Path]:
        """Every file of its kind to look at in a full scan."""
        ...

    def changed(self, paths: Iterable[Path]) -> Mapping[Path, str]:
        """Reload ``paths``; the outcome of each (a handler whose loads take long starts
        them in the background here and answers "started")."""
        ...

    def status(self) -> list[dict[str, Any]]:
        """One row per plugin of this kind (for ``GET /v1/plugins``)."""
        ...

    def failures(self) -> Mapping[Path, ReloadFailure]:
        """The plugins whose last load failed (the previous version serving), by path."""
        ...

    async def aclose(self) -> None:
        """Stop (or wait for) the loads it started in the background."""
        ...


def kind_of(folder: Path, path: Path) -> str | None:
    """The kind of plugin ``path`` (under ``folder``) belongs to, "manifest" for the
    folder's MANIFEST files, None for a file to ignore."""
    try:
        parts = path.relative_to(folder).parts
    except ValueError:
        return None
    if not parts or any(_IGNORED.search(part) for part in parts) or "__pycache__" in parts:
        return None
    if len(parts) == 1:
        return "manifest" if parts[0] in _MANIFEST_FILES else None
    if parts[0] in ("agents", "tools") and len(parts) == 2 and parts[1].endswith(".py"):
        return parts[0]
    if parts[0] == "models" and len(parts) >= 2:
        return "models"  # a file of a model folder, or the folder (renamed into place)
    return None


class PluginManager:
    """Watches ``folder`` and hands changes to ``handlers`` (by kind). A node service:
    :meth:`start` starts the watch, then looks at every file once (those written after the
    node's first load and before the watch began are not missed); :meth:`aclose` stops it.
    A folder that cannot be watched (the system's inotify limits) is logged, and the node
    serves without live reload."""

    def __init__(
        self,
        folder: Path,
        handlers: Iterable[PluginHandler],
        *,
        debounce_ms: int = 50,
        config: Path | None = None,
    ) -> None:
        self.folder = folder.resolve()
        # The node's config file (kind "settings"); None: not watched.
        self.config = config.resolve() if config is not None else None
        self.handlers = {handler.kind: handler for handler in handlers}
        self.debounce_ms = debounce_ms
        self.batches = 0  # batches of changes handed on (for tests and status)
        self._stop = asyncio.Event()
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._config_task: asyncio.Task[None] | None = None
        self._pending: set[Path] = set()  # changed, waiting for the quiet period to end
        self._last_change = 0.0
        self._flusher: asyncio.Task[None] | None = None
        self._step = min(_STEP_MS, debounce_ms)

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("the plugin manager was started already")
        # No plugin folder (a node with only its config file to watch): nothing to watch.
        self._task = asyncio.create_task(
            self._watch() if self.folder.is_dir() else self._idle(), name="agentd-plugin-watch"
        )
        if self.config is not None:
            self._config_task = asyncio.create_task(
                self._watch_config(self.config), name="agentd-config-watch"
            )
        # The watch's first step sets up the folder's watches (inotify), in this thread,
        # before it first waits: once it has run, every later write is seen.
        await asyncio.sleep(0)
        if self._config_task is not None and self._config_task.done():
            error = self._config_task.exception()
            log.error("settings reload is off: %s cannot be watched: %s", self.config, error)
            self._config_task = None
        if self._task.done():
            error = self._task.exception()
            log.error("live reload is off: %s cannot be watched: %s", self.folder, error)
            return
        self.rescan()
        self._ready.set()
        log.info("watching %s for plugin changes", self.folder)

    async def _idle(self) -> None:
        await self._stop.wait()

    async def ready(self) -> None:
        """Return once the folder is watched; RuntimeError if it is not."""
        if not self._ready.is_set():
            raise RuntimeError(f"the plugin folder {self.folder} is not watched")

    async def aclose(self) -> None:
        self._stop.set()
        if self._flusher is not None:
            self._flusher.cancel()
        for task in (self._task, self._config_task):
            if task is not None:
                try:
                    await task
                except Exception:
                    log.exception("the plugin watcher failed")
        self._task = self._config_task = None
        for handler in self.handlers.values():
            await handler.aclose()

    def failures(self) -> dict[str, dict[Path, ReloadFailure]]:
        """The plugins whose last load failed, by kind (``/readyz``'s detail names them)."""
        return {kind: dict(h.failures()) for kind, h in self.handlers.items() if h.failures()}

    def rescan(self) -> None:
        """Hand every handler all its files (unchanged ones are skipped by content)."""
        for handler in self.handlers.values():
            self._dispatch(handler, handler.files())

    def handle(self, paths: Iterable[Path]) -> None:
        """Hand one debounced batch of changed paths to their handlers."""
        by_kind: defaultdict[str, set[Path]] = defaultdict(set)
        for path in paths:
            kind = "settings" if path == self.config else kind_of(self.folder, path)
            if kind is not None:
                by_kind[kind].add(path)
        if not by_kind:
            return
        self.batches += 1
        if "manifest" in by_kind:
            self.rescan()
            return
        for kind, changed in by_kind.items():
            handler = self.handlers.get(kind)
            if handler is None:
                log.info("plugin change ignored (no live reload for %s yet): %s", kind, changed)
                continue
            self._dispatch(handler, changed)

    def _dispatch(self, handler: PluginHandler, paths: Iterable[Path]) -> None:
        try:
            handler.changed(paths)
        except Exception:
            # A handler reports its own failures; this is a bug in one: keep watching.
            log.exception("plugin handler %s failed", handler.kind)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        async for changes in watchfiles.awatch(
            self.folder,
            watch_filter=self._wanted,
            step=self._step,
            debounce=1600,  # (the longest the rust side holds a steady stream back)
            stop_event=self._stop,
        ):
            if changes:
                self._pending.update(Path(path) for _, path in changes)
                self._last_change = loop.time()
                if self._flusher is None or self._flusher.done():
                    self._flusher = asyncio.create_task(self._flush())

    async def _watch_config(self, config: Path) -> None:
        """The config file's folder, that one name only, not recursively (it may be a
        large folder such as the working directory)."""
        loop = asyncio.get_running_loop()
        async for changes in watchfiles.awatch(
            config.parent,
            watch_filter=lambda _, path: Path(path) == config,
            recursive=False,
            step=self._step,
            debounce=1600,
            stop_event=self._stop,
        ):
            if changes:
                self._pending.update(Path(path) for _, path in changes)
                self._last_change = loop.time()
                if self._flusher is None or self._flusher.done():
                    self._flusher = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        """Hand on the pending changes once none came for ``debounce_ms``."""
        loop = asyncio.get_running_loop()
        # The rust side hands a batch on after one step without news: that much of the
        # quiet period has passed already.
        quiet = max(0, self.debounce_ms - self._step) / 1000
        # A timer, not an Event: each change moves the end of the quiet period.
        while (wait := self._last_change + quiet - loop.time()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(wait)
        paths, self._pending = self._pending, set()
        self.handle(paths)

    def _wanted(self, change: watchfiles.Change, path: str) -> bool:
        return kind_of(self.folder, Path(path)) is not None
