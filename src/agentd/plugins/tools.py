"""Live reload of tool files (``plugins/tools/*.py``; docs/tools.md, "Live reload").

A changed file is read once; those bytes are verified (MANIFEST, signature: the node's
:class:`~agentd.plugins.Verifier`) and built into that file's component from those same
bytes, in the background (a build takes 10-25 s; a component already in the tools cache,
by content hash, is found in milliseconds). Calls keep using the components served until
the new one is ready; then a new component set (the built-ins and every file's current
component) is opened and installed in the tool service in one assignment
(:meth:`ToolService.install`): calls that start after it run on the new set, calls
running on the old one end on it, and the old set is closed once the last has.

One build of a file at a time (builds of different files queue, one at a time: each is a
busy core); a newer write of a file while its build runs wins: the older result is
discarded. A file that does not build (a syntax or import error, a componentize failure)
or is refused by verification leaves the previous version serving; one log line names the
file and the reason, kept in :meth:`ToolPlugins.failures` until a later write loads. A
deleted file's tools go (calls to them then get NOT_FOUND). The built-in tools are never
rebuilt or removed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentd.errors import AgentdError
from agentd.observability.plugin_metrics import NO_METRICS, PluginObserver
from agentd.plugins.failures import ReloadFailure, describe
from agentd.tools.build import (
    ComponentArtefact,
    ToolArtefact,
    build_unit,
    find_artefact,
    load_artefact,
    merge_components,
)
from agentd.tools.source import ToolUnit, plugin_unit

if TYPE_CHECKING:
    from agentd.settings import Settings
    from agentd.tools.service import ToolRuntime, ToolService

__all__ = ["ToolPlugins"]

log = logging.getLogger(__name__)

KIND = "tools"
BUILTIN = "builtin"


@dataclass(frozen=True, slots=True)
class _Job:
    """The newest content of one file to serve (``unit`` None: the file is gone)."""

    generation: int
    unit: ToolUnit | None
    started: float  # time.perf_counter() when the change was seen


class _Closed(Exception):
    """The handler was closed while a component set was being opened."""


class _Superseded(Exception):
    """A newer write of the file came while its build ran: that build is not waited for."""


class ToolPlugins:
    """Reloads the tool files of ``folder`` into ``service``.

    ``loaded``: the artefact the service was started with (None: the tools were not built
    at start, so the service has no runtime to replace, and changes are ignored: run
    ``agentd tools build``). ``open_runtime(artefact)`` opens a component set (the node's
    :func:`~agentd.tools.components.open_components` with its limits). ``check(path,
    content) -> version`` verifies the bytes read before they are built (the node's
    ``Verifier.check_bytes``; None accepts every file).
    """

    kind = KIND

    def __init__(
        self,
        service: ToolService,
        folder: Path,
        *,
        cache_dir: Path,
        loaded: ToolArtefact | None,
        open_runtime: Callable[[ToolArtefact], ToolRuntime],
        check: Callable[[Path, bytes], str] | None = None,
        observer: PluginObserver = NO_METRICS,
        build_timeout_s: float = 900.0,
    ) -> None:
        self.service = service
        self.folder = folder
        self._cache_dir = cache_dir
        self._open_runtime = open_runtime
        self._check = check
        self._observer = observer
        self._build_timeout_s = build_timeout_s
        self._enabled = loaded is not None
        # What the service serves, by origin ("builtin", "tools/NAME.py").
        self._components = {c.origin: c for c in loaded.components} if loaded else {}
        now = time.time()
        self._loaded_at: dict[str, float] = dict.fromkeys(self._components, now)
        self.last_failure: dict[Path, ReloadFailure] = {}
        # Per file: a count of changes seen (a job whose count is no longer the file's
        # newest is discarded), the newest job not yet started, and the task working on it.
        self._generations: dict[Path, int] = {}
        self._counter = itertools.count(1)
        self._queued: dict[Path, _Job] = {}
        self._running: dict[Path, _Job] = {}
        self._abandon: dict[Path, asyncio.Future[None]] = {}  # set: stop waiting for a build
        self._workers: dict[Path, asyncio.Task[None]] = {}
        self._swap = asyncio.Lock()  # one new component set at a time, from the newest state
        # Builds: one thread (each build is a busy core). Opening a set: another, so a
        # cache hit never waits behind a build of another file.
        self._builder = ThreadPoolExecutor(1, thread_name_prefix="agentd-tools-reload-build")
        self._opener = ThreadPoolExecutor(1, thread_name_prefix="agentd-tools-reload")
        self._lock = threading.Lock()  # guards _closed and _opening across threads
        self._closed = False
        self._opening: set[Any] = set()  # opened, not yet handed to the service
        self._warned_off = False

    @classmethod
    def from_settings(
        cls,
        service: ToolService,
        settings: Settings,
        *,
        check: Callable[[Path, bytes], str] | None = None,
        observer: PluginObserver = NO_METRICS,
    ) -> ToolPlugins:
        """The handler of a node's ``settings.plugins / "tools"`` (what the node loaded at
        start is what the tools cache holds for those files now)."""
        from agentd.tools.factory import tool_limits

        limits = tool_limits(settings)
        folder = settings.plugins / "tools"

        def open_runtime(artefact: ToolArtefact) -> ToolRuntime:
            from agentd.tools.components import open_components  # loads wasmtime

            return open_components(
                artefact, limits, pool_size=settings.tool_pool_size, threads=settings.tool_threads
            )

        return cls(
            service,
            folder,
            cache_dir=settings.tools_cache_dir,
            loaded=find_artefact(settings.tools_cache_dir, folder),
            open_runtime=open_runtime,
            check=check,
            observer=observer,
        )

    # -- the handler protocol ------------------------------------------------------------

    def files(self) -> list[Path]:
        """The tool files in the folder now and those served (a file deleted meanwhile is
        removed)."""
        folder = self.folder.resolve()
        now = set(folder.glob("*.py")) if folder.is_dir() else set()
        known = {folder / o.removeprefix("tools/") for o in self._components if o != BUILTIN}
        return sorted(p for p in now | known if not p.name.startswith("_"))

    def changed(self, paths: Iterable[Path]) -> dict[Path, str]:
        """Start reloading each of ``paths``; the outcome of each (started, unchanged,
        ignored, failed, refused, off)."""
        return {path: self.reload(path) for path in sorted(paths)}

    def reload(self, path: Path) -> str:
        """Read ``path`` once, verify it and start building those bytes (or removing its
        tools, if it is gone)."""
        path = path.resolve()
        if path.name.startswith("_"):
            return "ignored"  # as the build: helpers, not tool files
        if self._closed:
            return "ignored"
        if not self._enabled:
            if not self._warned_off:
                self._warned_off = True
                log.warning(
                    "tool file %s changed, but tools were not built at start: no live reload "
                    "of tools (run `agentd tools build`, then restart)",
                    path,
                )
            return "off"
        started = time.perf_counter()
        try:
            source: bytes | None = path.read_bytes()
        except FileNotFoundError:
            source = None
        except OSError as exc:
            self._supersede(path)
            return self._failed(path, "failed", f"cannot be read: {exc}", started)
        origin = _origin(path)
        if source is None:
            if origin not in self._components and path not in self._queued_or_running():
                self.last_failure.pop(path, None)
                return "unchanged"
            self._enqueue(path, None, started)
            return "started"
        unit = plugin_unit(path.name, source)
        if self._newest_digest(path) == unit.digest and path not in self.last_failure:
            return "unchanged"  # an editor's repeated save, a touch: nothing to do
        try:
            # These bytes are verified, and these bytes are built (not a second read).
            if self._check is not None:
                self._check(path, source)
        except AgentdError as exc:
            self._supersede(path)
            return self._failed(path, "refused", exc.message, started)
        self._enqueue(path, unit, started)
        return "started"

    def status(self) -> list[dict[str, Any]]:
        """The built-in tools, then each file: its tools, version (the unit digest), load
        time and last failure (if any)."""
        rows = []
        if (builtin := self._components.get(BUILTIN)) is not None:
            rows.append(self._row(BUILTIN, builtin, None))
        for path in sorted(set(self.files()) | set(self.last_failure)):
            origin = _origin(path)
            rows.append(
                self._row(origin, self._components.get(origin), self.last_failure.get(path))
            )
        return rows

    def failures(self) -> dict[Path, ReloadFailure]:
        return dict(self.last_failure)

    async def aclose(self) -> None:
        """Stop waiting for builds (one already running on its thread finishes there and
        is discarded) and close any component set opened but not yet installed."""
        with self._lock:
            self._closed = True
        workers = list(self._workers.values())
        for worker in workers:
            worker.cancel()
        for worker in workers:
            try:
                await worker
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("tool reload failed")
        self._builder.shutdown(wait=False, cancel_futures=True)
        # Opening a set takes milliseconds: wait for it, then close what nobody took.
        await asyncio.to_thread(self._opener.shutdown, wait=True, cancel_futures=True)
        with self._lock:
            opened, self._opening = self._opening, set()
        for runtime in opened:
            runtime.close()

    # -- the work ------------------------------------------------------------------------

    def _enqueue(self, path: Path, unit: ToolUnit | None, started: float) -> None:
        generation = self._supersede(path)
        self._queued[path] = _Job(generation, unit, started)
        if (abandon := self._abandon.get(path)) is not None and not abandon.done():
            abandon.set_result(None)  # the newest content wins: its build is not awaited
        worker = self._workers.get(path)
        if worker is None or worker.done():
            self._workers[path] = asyncio.get_running_loop().create_task(
                self._work(path), name=f"agentd-tool-reload-{path.name}"
            )

    def _supersede(self, path: Path) -> int:
        """Count a change of ``path``: any job for an older content is discarded."""
        generation = self._generations[path] = next(self._counter)
        return generation

    def _current(self, path: Path, job: _Job) -> bool:
        return self._generations.get(path) == job.generation and not self._closed

    def _queued_or_running(self) -> set[Path]:
        return {path for path, task in self._workers.items() if not task.done()}

    def _newest_digest(self, path: Path) -> str | None:
        """The digest of the newest content of ``path`` served or on its way."""
        job = self._queued.get(path)
        if job is None and path in self._queued_or_running():
            job = self._running.get(path)
        if job is not None and self._current(path, job):
            return job.unit.digest if job.unit is not None else None
        component = self._components.get(_origin(path))
        return component.digest if component is not None else None

    async def _work(self, path: Path) -> None:
        """Run the jobs of one file in turn, the newest each time, until none is left."""
        try:
            while (job := self._queued.pop(path, None)) is not None:
                self._running[path] = job
                try:
                    await self._run(path, job)
                except asyncio.CancelledError:
                    raise
                except (_Closed, _Superseded):
                    pass  # closed meanwhile, or a newer write is next
                except Exception as exc:  # a defect here: report it as this file's failure
                    log.exception("tool reload of %s failed", path)
                    if self._current(path, job):
                        self._failed(path, "failed", describe(exc), job.started)
                finally:
                    self._running.pop(path, None)
        finally:
            if self._workers.get(path) is asyncio.current_task():
                del self._workers[path]

    async def _run(self, path: Path, job: _Job) -> None:
        origin = _origin(path)
        if job.unit is None:
            async with self._swap:
                if not self._current(path, job):
                    return
                components = {o: c for o, c in self._components.items() if o != origin}
                await self._install(components)
            self._loaded_at.pop(origin, None)
            self.last_failure.pop(path, None)
            self._observer.reloaded(KIND, "removed", time.perf_counter() - job.started)
            log.info("tool file %s deleted: its tools are removed", path)
            return
        try:
            component = await self._build(path, job.unit)
        except AgentdError as exc:  # the tool chain failed (ToolBuildError)
            if self._current(path, job):
                self._failed(path, "failed", exc.message, job.started)
            return
        if not self._current(path, job):
            log.debug("tool file %s: a newer write supersedes build %s", path, job.unit.digest)
            return
        if (reason := _broken(component)) is not None:
            self._failed(path, "failed", reason, job.started)
            return
        async with self._swap:
            if not self._current(path, job):
                return
            await self._install({**self._components, origin: component})
        self._loaded_at[origin] = time.time()
        self.last_failure.pop(path, None)
        seconds = time.perf_counter() - job.started
        self._observer.reloaded(KIND, "ok", seconds)
        log.info(
            "tool file %s loaded (version %s, %.0f ms): %s",
            path,
            component.digest[:12],
            seconds * 1000,
            ", ".join(t.name for t in component.tools),
        )

    async def _build(self, path: Path, unit: ToolUnit) -> ComponentArtefact:
        """The unit's component: from the cache at once when built before, else built on
        the build thread (after any build already queued there). Raises _Superseded when a
        newer write of ``path`` comes first (the build goes on, its result unused)."""
        loop = asyncio.get_running_loop()
        digest = unit.digest
        found = await loop.run_in_executor(self._opener, load_artefact, self._cache_dir / digest)
        if found is not None:
            return found
        keep = {c.digest for c in self._components.values()}
        timeout_s = self._build_timeout_s
        build = loop.run_in_executor(
            self._builder,
            lambda: build_unit(self._cache_dir, unit, keep=keep, timeout_s=timeout_s),
        )
        abandon = self._abandon[path] = loop.create_future()
        try:
            await asyncio.wait({build, abandon}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if self._abandon.get(path) is abandon:
                del self._abandon[path]
            abandon.cancel()
        if not build.done():
            build.cancel()  # taken off the queue if it has not started; else it finishes
            raise _Superseded
        return build.result()

    async def _install(self, components: dict[str, ComponentArtefact]) -> None:
        """Open a set of ``components`` and install it in the service (held: ``_swap``)."""
        ordered = sorted(components, key=lambda origin: (origin != BUILTIN, origin))
        artefact = merge_components([components[origin] for origin in ordered])

        def open_set() -> ToolRuntime:
            runtime = self._open_runtime(artefact)
            runtime.refill()  # its first calls find instances ready
            with self._lock:
                if self._closed:
                    runtime.close()
                    raise _Closed
                self._opening.add(runtime)
            return runtime

        loop = asyncio.get_running_loop()
        runtime = await loop.run_in_executor(self._opener, open_set)
        with self._lock:
            self._opening.discard(runtime)
        if not self.service.install(artefact.tools, runtime):
            raise _Closed
        self._components = components

    def _row(
        self, origin: str, component: ComponentArtefact | None, failure: ReloadFailure | None
    ) -> dict[str, Any]:
        return {
            "file": origin,
            "tools": [t.name for t in component.tools] if component else [],
            "version": component.digest if component else None,
            "loaded_at": self._loaded_at.get(origin) if component else None,
            "last_failure": failure.to_json() if failure else None,
        }

    def _failed(self, path: Path, outcome: str, reason: str, started: float) -> str:
        self.last_failure[path] = ReloadFailure.now(reason, outcome)
        log.error("tool file %s not loaded (the previous version serves): %s", path, reason)
        self._observer.reloaded(KIND, outcome, time.perf_counter() - started)
        return outcome


def _origin(path: Path) -> str:
    return f"tools/{path.name}"


def _broken(component: ComponentArtefact) -> str | None:
    """Why a built component cannot replace the served one: the file broke the build, or
    failed to import (no tools, a load error). None when it loads."""
    if component.failed:
        return str(component.manifest["error"])
    if component.load_errors and not component.tools:
        return "; ".join(error.message for error in component.load_errors)
    return None
