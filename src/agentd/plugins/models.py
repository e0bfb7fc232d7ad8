"""Live reload of model folders (``plugins/models/<name>/...``), tensor and language models.

A change to any file of a folder (or to the folder itself) reloads that folder's model in
the background: its files are verified (the node's Verifier: MANIFEST and signature; their
content hash is the version), the catalogue reads its config again, and the model's service
builds the new version beside the old one and switches when it is ready
(:meth:`InferenceService.load`, :meth:`GenerationService.load`). The old version serves until
then, and keeps serving if the new one fails: the reason is kept (:meth:`failures`), logged
once (by the service that failed to load it, or here for a refusal) and counted, and a
later good write recovers.

One load per model at a time: writes that come during a load mark the folder again, and it
loads once more after, with what is there then (the newest write wins; a big model file
caught half-copied fails that load and the completed write loads). A new folder loads; a
deleted folder's model is unloaded once its calls in flight have finished (NOT_FOUND after).
A folder whose config changes kind (tensor <-> language model) loads into the other service
and, once that load succeeded, leaves the first.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentd.errors import AgentdError, Code, Unavailable
from agentd.models.catalog import ModelCatalog, ModelKind
from agentd.observability.plugin_metrics import NO_METRICS, PluginObserver
from agentd.plugins.failures import ReloadFailure, describe
from agentd.plugins.manifest import _files_under

if TYPE_CHECKING:
    from agentd.generate.service import GenerationService
    from agentd.inference.service import InferenceService

__all__ = ["ModelPlugins", "folder_version"]

log = logging.getLogger(__name__)

KIND = "models"


def folder_version(folder: Path) -> str:
    """The SHA-256 of a model folder's files (their ``sha256sum`` lines, sorted by path,
    paths as ``models/NAME/...``, as :meth:`Verifier.check_folder` gives without a
    MANIFEST): its version when no Verifier checks it."""
    base = folder.parent.parent
    lines = "".join(
        f"{hashlib.sha256((base / rel).read_bytes()).hexdigest()}  {rel}\n"
        for rel in sorted(_files_under(base, folder))
    )
    return hashlib.sha256(lines.encode()).hexdigest()


class _Logged(Unavailable):
    """A load that failed in its service, which logged why."""


@dataclass(slots=True)
class _Model:
    """What the handler knows of one folder's model."""

    kind: ModelKind | None = None  # the service serving it (None: none yet)
    version: str | None = None  # the content hash of the version served
    loaded_at: float | None = None
    failure: ReloadFailure | None = None
    dirty: bool = False  # changed since its load began: load again after
    task: asyncio.Task[None] | None = None


class ModelPlugins:
    """Reloads the model folders of ``folder`` (``plugins/models``) into ``inference``
    (tensor models) and ``generation`` (language models; None: a node without them).

    ``check(folder) -> version`` verifies a folder's files before it loads (raising an
    AgentdError, such as PluginRefused, to refuse it): the node's ``Verifier.check_folder``.
    None: every folder is accepted, :func:`folder_version` its version.
    """

    kind = KIND

    def __init__(
        self,
        inference: InferenceService | None,
        generation: GenerationService | None,
        folder: Path,
        *,
        catalog: ModelCatalog,
        check: Callable[[Path], str] | None = None,
        observer: PluginObserver = NO_METRICS,
    ) -> None:
        self.inference = inference
        self.generation = generation
        self.folder = folder.resolve()
        self.catalog = catalog
        self._check = check or folder_version
        self._observer = observer
        self._models: dict[str, _Model] = {}
        self._scanned = False
        self._closed = False

    # -- the handler protocol -----------------------------------------------------------

    def files(self) -> list[Path]:
        """Every file of every model folder now, and the folder of each model known before
        (a folder deleted meanwhile is unloaded)."""
        found: set[Path] = {self.folder / name for name in self._models}
        for source in self._folders():
            found.update(p for p in source.rglob("*") if p.is_file())
        return sorted(found)

    def changed(self, paths: Iterable[Path]) -> dict[Path, str]:
        """Start loading each folder of ``paths`` in the background (after the load under
        way, if one is); "started" for each path, "ignored" for one outside a model
        folder."""
        # The first call is the manager's first full scan: what serves then was loaded by
        # the node at start from these folders.
        first, self._scanned = not self._scanned, True
        outcomes: dict[Path, str] = {}
        for path in paths:
            name = self._name_of(path)
            if name is None:
                outcomes[path] = "ignored"
                continue
            self._schedule(name, adopt=first)
            outcomes[path] = "started"
        return outcomes

    def status(self) -> list[dict[str, Any]]:
        """One row per model folder (and per model of a folder deleted while it unloads)."""
        names = set(self._models) | {source.name for source in self._folders()}
        rows = []
        for name in sorted(names):
            model = self._models.get(name) or _Model()
            kind = model.kind or self._kind_now(name)
            served = self._served(name, kind)
            loading = model.task is not None and not model.task.done()
            if served:
                state = "READY"
            elif loading:
                state = "LOADING"
            elif model.failure is not None:
                state = "FAILED"
            else:
                state = "UNAVAILABLE"
            rows.append(
                {
                    "name": name,
                    "kind": kind.value if kind is not None else None,
                    "folder": str(self.folder / name),
                    "version": model.version if served else None,
                    "state": state,
                    "loaded_at": model.loaded_at if served else None,
                    "last_failure": model.failure.to_json() if model.failure else None,
                }
            )
        return rows

    def failures(self) -> dict[Path, ReloadFailure]:
        return {
            self.folder / name: model.failure
            for name, model in self._models.items()
            if model.failure is not None
        }

    async def aclose(self) -> None:
        """Stop the loads under way (a model built meanwhile is closed by its service)."""
        self._closed = True
        tasks = [m.task for m in self._models.values() if m.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def settled(self) -> None:
        """Return once no load is under way (tests, ``agentd bench reload``)."""
        while tasks := [m.task for m in self._models.values() if m.task and not m.task.done()]:
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- loading ------------------------------------------------------------------------

    def _folders(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return [
            p for p in self.folder.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))
        ]

    def _name_of(self, path: Path) -> str | None:
        try:
            parts = path.resolve().relative_to(self.folder).parts
        except ValueError:
            return None
        if not parts or parts[0].startswith(("_", ".")):
            return None  # the catalogue skips these folders too
        name = parts[0]
        if name not in self._models and not (self.folder / name).is_dir():
            return None  # a plain file in models/, or a folder never seen that is gone
        return name

    def _schedule(self, name: str, *, adopt: bool = False) -> None:
        if self._closed:
            return
        model = self._models.get(name)
        if model is None:
            model = self._models[name] = _Model()
            if adopt:
                self._adopt(name, model)
        model.dirty = True
        if model.task is None or model.task.done():
            model.task = asyncio.get_running_loop().create_task(
                self._run(name, model), name=f"agentd-model-reload-{name}"
            )

    def _adopt(self, name: str, model: _Model) -> None:
        """A folder of the first scan whose model the node loaded at start: that version
        serves (its version is taken from the folder on the first look, not loaded again)."""
        kind = self._kind_now(name)
        if kind is not None and self._served(name, kind):
            model.kind = kind
            model.version = ""  # adopted: the first look takes the folder's hash
            loaded = self.generation.loaded_at.get(name) if self.generation else None
            model.loaded_at = loaded if kind is ModelKind.LANGUAGE and loaded else time.time()

    async def _run(self, name: str, model: _Model) -> None:
        while model.dirty:
            model.dirty = False
            started = time.perf_counter()
            try:
                outcome = await self._reload(name, model)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug here must not end the watch: report it
                log.exception("model plugin %s: reload failed", name)
                outcome = self._failed(name, model, "failed", describe(exc))
            if outcome != "unchanged":
                self._observer.reloaded(KIND, outcome, time.perf_counter() - started)
        if model.kind is None and model.failure is None and not (self.folder / name).is_dir():
            self._models.pop(name, None)  # removed: forgotten

    async def _reload(self, name: str, model: _Model) -> str:
        source = self.folder / name
        if not source.is_dir():
            return await self._remove(name, model)
        try:
            version = await asyncio.to_thread(self._check, source)
        except AgentdError as exc:
            return self._failed(name, model, "refused", exc.message)
        except OSError as exc:  # a file removed while it was read: the next event retries
            return self._failed(name, model, "failed", f"cannot be read: {exc}")
        if model.version == "":
            model.version, model.failure = version, None  # adopted at start: this serves
            return "unchanged"
        if version == model.version and model.failure is None:
            return "unchanged"  # a touch, a repeated save: nothing to do
        kind = self.catalog.entry(source).kind  # the config as it is now
        try:
            if kind is ModelKind.TENSOR:
                await self._load_tensor(name)
            else:
                await self._load_language(name)
        except AgentdError as exc:
            logged = isinstance(exc, _Logged)  # the service logged it: one line, not two
            return self._failed(name, model, "failed", exc.message, logged=logged)
        previous, model.kind = model.kind, kind
        if previous is not None and previous is not kind:
            await self._unload(name, previous)  # its kind changed: the old service lets go
        model.version, model.loaded_at, model.failure = version, time.time(), None
        log.info("model plugin %s loaded (%s, version %s)", name, kind.value, version[:12])
        return "ok"

    async def _load_tensor(self, name: str) -> None:
        if self.inference is None:
            raise Unavailable("this node serves no tensor models")
        entry = await self.inference.load(name)
        if entry.load_error:
            raise _Logged(entry.load_error)

    async def _load_language(self, name: str) -> None:
        if self.generation is None:
            raise Unavailable("this node serves no language models")
        try:
            await self.generation.load(name)
        except AgentdError as exc:
            if exc.code is Code.NOT_FOUND:
                raise
            raise _Logged(exc.message) from exc

    async def _remove(self, name: str, model: _Model) -> str:
        """The folder is gone: its model leaves its service once its calls have finished
        (a model of the same name in an earlier folder, a built-in, loads instead)."""
        model.failure = None
        if model.kind is None:
            return "unchanged"
        kind, model.kind, model.version, model.loaded_at = model.kind, None, None, None
        await self._unload(name, kind)
        self.catalog.scan()
        if any(e.name == name for e in self.catalog.entries(kind)):
            try:  # the built-in of that name serves again
                await (self._load_tensor if kind is ModelKind.TENSOR else self._load_language)(name)
            except AgentdError as exc:
                log.error("model %s: the earlier folder's version did not load: %s", name, exc)
        log.info("model plugin %s deleted: unloaded", name)
        return "removed"

    async def _unload(self, name: str, kind: ModelKind) -> None:
        try:
            if kind is ModelKind.TENSOR and self.inference is not None:
                await self.inference.unload(name, drain=True)
                self.inference.index()  # forgets it: NOT_FOUND from now on
            elif kind is ModelKind.LANGUAGE and self.generation is not None:
                await self.generation.unload(name)
        except AgentdError:
            pass  # not loaded (unloaded by hand meanwhile): nothing to let go

    def _failed(
        self, name: str, model: _Model, outcome: str, reason: str, *, logged: bool = False
    ) -> str:
        model.failure = ReloadFailure.now(reason, outcome)
        if not logged:
            serving = " (the previous version serves)" if self._served(name, model.kind) else ""
            log.error("model plugin %s not loaded%s: %s", self.folder / name, serving, reason)
        return outcome

    def _kind_now(self, name: str) -> ModelKind | None:
        source = self.folder / name
        if not source.is_dir():
            return None
        return self.catalog.entry(source).kind

    def _served(self, name: str, kind: ModelKind | None) -> bool:
        if kind is ModelKind.TENSOR and self.inference is not None:
            try:
                return self.inference.is_ready(name)
            except AgentdError:
                return False
        if kind is ModelKind.LANGUAGE and self.generation is not None:
            return any(m.name == name for m in self.generation.models())
        return False
