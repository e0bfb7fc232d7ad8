"""The model repository: the tensor models of the node's catalogue, their load state, their
executors.

The folders come from the :class:`~agentd.models.catalog.ModelCatalog` the node shares with
the generation service (which serves the language models in it). Each folder holds a model
file and an optional ``config.yaml``. A model that fails to load is marked FAILED with the
reason; the others keep serving.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from agentd.errors import AgentdError, FailedPrecondition, Internal, InvalidArgument, NotFound
from agentd.inference.config import parse_model_config
from agentd.inference.protocols import ModelLoader, RuntimeExecutor
from agentd.inference.types import ModelConfig
from agentd.models.catalog import CONFIG_FILE, ModelCatalog, ModelKind, builtin_models_dir

__all__ = ["ModelEntry", "ModelRepository", "ModelState", "builtin_models_dir"]

log = logging.getLogger(__name__)


class ModelState(enum.Enum):
    UNLOADED = "UNAVAILABLE"
    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"


@dataclass(slots=True)
class ModelEntry:
    name: str
    source: Path
    builtin: bool
    state: ModelState = ModelState.UNLOADED
    reason: str = ""
    executor: RuntimeExecutor | None = None
    config: ModelConfig | None = None
    # Why the last load or reload failed ("" after a success). A failed reload of a
    # serving model leaves it READY on its previous executor, so state alone cannot say.
    load_error: str = ""


class ModelRepository:
    """The tensor models of ``catalog`` (or of a catalogue over ``folders``), loaded with the
    first loader that accepts each."""

    def __init__(
        self, loaders: Iterable[ModelLoader], catalog: ModelCatalog | Iterable[Path]
    ) -> None:
        self._loaders = list(loaders)
        self._catalog = catalog if isinstance(catalog, ModelCatalog) else ModelCatalog(catalog)
        self._entries: dict[str, ModelEntry] = {}
        self._scan_entries()

    @property
    def catalog(self) -> ModelCatalog:
        return self._catalog

    def scan(self) -> None:
        """(Re)discover model folders. Known entries keep their state; a later folder's model
        replaces an earlier one's of the same name (one that serves keeps serving, and its
        next load reads the later folder)."""
        self._catalog.scan()
        self._scan_entries()

    def _scan_entries(self) -> None:
        tensors = self._catalog.entries(ModelKind.TENSOR)
        for found in tensors:
            current = self._entries.get(found.name)
            if current is not None and current.source == found.source:
                continue
            if current is not None and current.executor is not None:
                # Overridden (or its override deleted) while it serves: the next load
                # (live reload, agentd models load) reads the folder the catalogue names now.
                current.source, current.builtin = found.source, found.builtin
                continue
            self._entries[found.name] = ModelEntry(found.name, found.source, found.builtin)
        # An unloaded model whose folder is gone (or is a language model now) is forgotten.
        names = {found.name for found in tensors}
        for name, entry in list(self._entries.items()):
            if entry.executor is None and name not in names:
                del self._entries[name]

    def entries(self) -> list[ModelEntry]:
        return sorted(self._entries.values(), key=lambda e: e.name)

    def entry(self, name: str) -> ModelEntry:
        entry = self._entries.get(name)
        if entry is None:
            raise NotFound(f"unknown model {name!r}")
        return entry

    def load(self, name: str) -> tuple[ModelEntry, RuntimeExecutor | None]:
        """Load (or reload) one model; blocking, run it off the event loop. Returns the
        entry and the executor the new one replaced, for the caller to close once nothing
        runs on it. A failed reload of a serving model keeps it serving the previous
        version (READY, with ``load_error`` set), as Triton does; otherwise FAILED."""
        self.begin_load(name)
        try:
            config, executor = self.build(name)
        except AgentdError as exc:
            return self.load_failed(name, exc), None
        return self.install(name, config, executor)

    def begin_load(self, name: str) -> ModelEntry:
        """Mark ``name`` LOADING, unless it serves a version (that one keeps serving)."""
        entry = self.entry(name)
        if entry.executor is None or entry.state is not ModelState.READY:
            entry.state = ModelState.LOADING
        return entry

    def build(self, name: str) -> tuple[ModelConfig, RuntimeExecutor]:
        """Read ``name``'s config and make a new executor; blocking (run it off the event
        loop). Changes no entry: the version being served keeps serving meanwhile. Raises
        an AgentdError saying why the model cannot load."""
        entry = self.entry(name)
        found = self._catalog.entry(entry.source)  # the config as it is now
        if found.kind is not ModelKind.TENSOR:
            raise InvalidArgument(f"{found.config_path}: a language model, not a tensor model")
        config = parse_model_config(found.require_document(), found.config_path, entry.name)
        if config.name != entry.name:
            raise InvalidArgument(
                f"{entry.source / CONFIG_FILE}: name {config.name!r} differs from its "
                f"folder name {entry.name!r}"
            )
        loader = self._loader_for(entry.source, config.platform)
        try:
            return config, loader.load(entry.source, config)
        except AgentdError:
            raise
        except Exception as exc:
            # A loader's own bug or its library's error: the load fails with a reason (a
            # raw error would leave the model LOADING and reach the caller unwrapped).
            raise Internal(
                f"{entry.source}: the {config.platform} loader failed: {type(exc).__name__}: {exc}"
            ) from exc

    def install(
        self, name: str, config: ModelConfig, executor: RuntimeExecutor
    ) -> tuple[ModelEntry, RuntimeExecutor | None]:
        """Make ``executor`` (from ``build``) the served version of ``name``; returns the
        entry and the executor it replaced, for the caller to close once nothing runs on
        it."""
        entry = self.entry(name)
        old, entry.executor, entry.config = entry.executor, executor, config
        entry.state, entry.reason, entry.load_error = ModelState.READY, "", ""
        log.info("model %s loaded from %s", name, entry.source)
        return entry, old

    def load_failed(self, name: str, exc: AgentdError) -> ModelEntry:
        """Record why ``build`` failed: a serving model keeps serving its previous version
        (READY, with ``load_error`` set), as Triton does; any other becomes FAILED."""
        entry = self.entry(name)
        entry.load_error = exc.message
        if entry.executor is not None and entry.state is ModelState.READY:
            entry.reason = f"reload failed, serving the previous version: {exc.message}"
            log.error("model %s failed to reload (still serving): %s", name, exc.message)
        else:
            entry.state, entry.reason, entry.executor = ModelState.FAILED, exc.message, None
            log.error("model %s failed to load: %s", name, exc.message)
        return entry

    def unload(self, name: str) -> ModelEntry:
        entry = self.entry(name)
        if entry.executor is not None:
            entry.executor.close()
        entry.state, entry.reason, entry.executor = ModelState.UNLOADED, "", None
        entry.load_error = ""
        return entry

    def _loader_for(self, source: Path, platform: str) -> ModelLoader:
        for loader in self._loaders:
            if loader.platform == platform and loader.can_load(source):
                return loader
        known = sorted({loader.platform for loader in self._loaders})
        if platform not in known:
            raise FailedPrecondition(
                f"no loader for platform {platform!r} (installed: {', '.join(known)})"
            )
        raise InvalidArgument(f"{source}: no model file that the {platform} loader accepts")
