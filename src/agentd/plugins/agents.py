"""Live reload of agent plugins (``plugins/agents/*.py``).

A changed file is read once; those bytes are verified (MANIFEST, signature: the node's
:class:`~agentd.plugins.Verifier`, or their SHA-256 alone), run as a fresh module beside
the old one (a module name of its own per version), its Agent subclasses instantiated once
to check their constructors, and then swapped into the registry in one assignment
(:meth:`AgentRegistry.swap_file`). Turns already running finish on the old version; each
instance moves to the new type before its next turn (``Activation._upgrade``), its state
kept (and passed through the type's ``migrate_state`` when it has one). The old module
leaves ``sys.modules``; its objects go once no instance uses them. In a running node the
read, verification, import and constructor check run on a worker thread (one file at a
time): only the swap runs on the event loop, so a plugin whose import takes seconds does
not stall the calls being served.

Any failure (syntax or import error, a constructor that raises, a refusal) leaves the
previous version serving; one log line names the file and the reason, and the reason is
kept in :attr:`AgentPlugins.last_failure` until a later write of that file loads.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentd.agents.base import Agent
from agentd.agents.registry import AgentRegistry, agent_classes, check_name, import_plugin
from agentd.errors import AgentdError
from agentd.observability.plugin_metrics import NO_METRICS, PluginObserver
from agentd.plugins.failures import ReloadFailure, describe

__all__ = ["AgentPlugins"]

log = logging.getLogger(__name__)

KIND = "agents"


@dataclass(frozen=True, slots=True)
class _Prepared:
    """A new version of one file, imported and checked, not yet serving (``module`` None:
    the file was deleted)."""

    path: Path
    started: float
    module: str | None = None
    version: str = ""
    types: tuple[type[Agent], ...] = ()
    names: tuple[str, ...] = ()


class AgentPlugins:
    """Reloads the agent plugin files of one folder into ``registry``.

    ``check(path, content) -> version`` verifies the content read from a file before it
    runs (raising an AgentdError, such as PluginRefused, to refuse it): the node's
    ``Verifier.check_bytes``. None: every file is accepted, its SHA-256 its version.
    """

    kind = KIND

    def __init__(
        self,
        registry: AgentRegistry,
        folder: Path,
        *,
        check: Callable[[Path, bytes], str] | None = None,
        observer: PluginObserver = NO_METRICS,
    ) -> None:
        self.registry = registry
        self.folder = folder
        self._check = check
        self._observer = observer
        self.last_failure: dict[Path, ReloadFailure] = {}
        # A module name per version: the new one runs beside the old until the swap.
        self._versions = itertools.count(1)
        self._queue: list[Path] = []  # changed files waiting for the reload worker
        self._worker: asyncio.Task[None] | None = None
        self._scanned = False

    def files(self) -> list[Path]:
        """Every file to look at in a full scan: those in the folder now and those loaded
        before (a file deleted meanwhile is removed)."""
        now = set(self.folder.glob("*.py")) if self.folder.is_dir() else set()
        known = {p for p in self.registry.files if p.parent == self.folder.resolve()}
        return sorted({p.resolve() for p in now} | known)

    def changed(self, paths: Iterable[Path]) -> dict[Path, str]:
        """Reload each of ``paths`` (files of this folder that changed). Within a running
        event loop each file's import runs on a worker thread, one file at a time in the
        order they came, and only the swap runs on the loop: a plugin whose import takes
        seconds (a large dependency, a big file) does not stall the calls being served.
        Returns "started" for each (the outcome is logged, counted and in ``status()``);
        outside a loop, each file's outcome (ok, unchanged, removed, failed, refused)."""
        ordered = sorted(paths)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return {path: self.reload(path) for path in ordered}
        if not self._scanned:
            # The first look, as the manager starts (before the node serves): done here,
            # so that a write after start() is read after it, not raced by it.
            self._scanned = True
            return {path: self.reload(path) for path in ordered}
        self._queue.extend(p for p in ordered if p not in self._queue)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain(), name="agentd-agent-reload")
        return dict.fromkeys(ordered, "started")

    async def _drain(self) -> None:
        while self._queue:
            path = self._queue.pop(0)
            try:
                prepared = await asyncio.to_thread(self._prepare, path)
                self._install(prepared)
            except Exception:  # a bug here must not end the reloads of later files
                log.exception("agent plugin %s: the reload failed", path)

    async def aclose(self) -> None:
        """Stop reloading (an import already running on its thread ends unused)."""
        self._queue.clear()
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker

    def reload(self, path: Path) -> str:
        """Load the current content of ``path`` (or remove its types, if it is gone), all
        on this thread; the outcome."""
        return self._install(self._prepare(path))

    def _prepare(self, path: Path) -> _Prepared | str:
        """Read, verify, import and construct-check a new version of ``path`` (any thread:
        it changes nothing that serves). A _Prepared to install, or an outcome."""
        path = path.resolve()
        started = time.perf_counter()
        try:
            source: bytes | None = path.read_bytes()
        except FileNotFoundError:
            source = None
        except OSError as exc:
            return self._failed(path, "failed", f"cannot be read: {exc}", started)
        if source is None:
            return _Prepared(path, started)  # deleted: its types go
        digest = hashlib.sha256(source).hexdigest()
        current = self.registry.files.get(path)
        if not source.strip() and current is not None and current.names:
            # An empty file that served agents is most often one read between a writer's
            # truncate and its write (whose own event follows): keep what serves. Deleting
            # the file is how its agents are removed.
            return self._failed(
                path, "failed", "is empty now (delete the file to remove its agents)", started
            )
        if current is not None and path not in self.last_failure and current.version == digest:
            return "unchanged"  # an editor's repeated save, a touch: nothing to do
        try:
            # These bytes are verified, and these bytes run (not a second read).
            version = digest if self._check is None else self._check(path, source)
        except AgentdError as exc:
            return self._failed(path, "refused", exc.message, started)
        module_name = f"agentd_plugins.agents.{path.stem}.v{next(self._versions)}"
        try:
            module = import_plugin(path, source, module_name)
            try:
                types = agent_classes(module)
                for agent_type in types:
                    agent_type()  # its constructor must work before it may serve
                    check_name(agent_type)  # (reading a name runs plugin code too)
                names = tuple(t.name for t in types)
            except BaseException:
                sys.modules.pop(module_name, None)
                raise
        except BaseException as exc:  # SystemExit and the like from plugin code included
            return self._failed(path, "failed", describe(exc), started)
        return _Prepared(path, started, module_name, version, tuple(types), names)

    def _install(self, prepared: _Prepared | str) -> str:
        """Swap a prepared version in (on the loop's thread), or pass an outcome on."""
        if isinstance(prepared, str):
            return prepared
        path, started = prepared.path, prepared.started
        if prepared.module is None:
            previous = self.registry.remove_file(path)
            self.last_failure.pop(path, None)
            if previous is None:
                return "unchanged"
            sys.modules.pop(previous.module, None)
            log.info(
                "agent plugin %s deleted: removed %s", path, ", ".join(previous.names) or "nothing"
            )
            self._observer.reloaded(KIND, "removed", time.perf_counter() - started)
            return "removed"
        try:
            previous = self.registry.swap_file(
                path, prepared.module, prepared.version, prepared.types
            )
        except BaseException as exc:  # plugin code (a metaclass) runs here too
            sys.modules.pop(prepared.module, None)
            return self._failed(path, "failed", describe(exc), started)
        if previous is not None and previous.module != prepared.module:
            sys.modules.pop(previous.module, None)  # the old version's module goes
        self.last_failure.pop(path, None)
        seconds = time.perf_counter() - started
        self._observer.reloaded(KIND, "ok", seconds)
        log.info(
            "agent plugin %s loaded (version %s, %.1f ms): %s",
            path,
            prepared.version[:12],
            seconds * 1000,
            ", ".join(prepared.names) or "no agent types",
        )
        return "ok"

    def status(self) -> list[dict[str, Any]]:
        """Each file: its agent types, version, load time and last failure (if any)."""
        rows = []
        for path in self.files():
            loaded = self.registry.files.get(path)
            failure = self.last_failure.get(path)
            rows.append(
                {
                    "file": str(path),
                    "agents": list(loaded.names) if loaded else [],
                    "version": loaded.version if loaded else None,
                    "loaded_at": loaded.loaded_at if loaded else None,
                    "last_failure": failure.to_json() if failure else None,
                }
            )
        return rows

    def failures(self) -> dict[Path, ReloadFailure]:
        return dict(self.last_failure)

    def _failed(self, path: Path, outcome: str, reason: str, started: float) -> str:
        self.last_failure[path] = ReloadFailure.now(reason, outcome)
        log.error("agent plugin %s not loaded (the previous version serves): %s", path, reason)
        self._observer.reloaded(KIND, outcome, time.perf_counter() - started)
        return outcome
