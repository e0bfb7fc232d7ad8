"""The model catalogue: every model folder of a node, its ``config.yaml`` read once, its kind.

Sources are the built-in models shipped in this package and the folders of
``plugins/models/`` (a later folder's model replaces an earlier one's of the same name and
kind). A folder whose ``config.yaml`` says ``kind: language-model`` is a language model
(served by ``agentd.generate``); any other is a tensor model (served by
``agentd.inference``). Both services take the same catalogue, so each config is read once:
a scan parses a ``config.yaml`` again only when its bytes changed, which is how a model
reload sees an edited config (a stat would miss an edit of the same size within the file
system's timestamp tick).

Plain Python and PyYAML; each service parses the document into its own typed config.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from agentd.errors import InvalidArgument

__all__ = [
    "CONFIG_FILE",
    "LANGUAGE_MODEL_KIND",
    "CatalogEntry",
    "ModelCatalog",
    "ModelKind",
    "builtin_models_dir",
    "read_document",
]

CONFIG_FILE = "config.yaml"
LANGUAGE_MODEL_KIND = "language-model"


class ModelKind(enum.Enum):
    TENSOR = "tensor"  # a KServe / ctx.infer model (agentd.inference)
    LANGUAGE = LANGUAGE_MODEL_KIND  # a language model (agentd.generate)


def builtin_models_dir() -> Path:
    """The folder of models shipped inside the package."""
    return Path(str(resources.files("agentd.models")))


def read_document(path: Path) -> dict[str, Any] | None:
    """``path`` parsed as a YAML mapping; None when there is no such file. Raises
    InvalidArgument naming the file when it cannot be read or is not a mapping."""
    return _parse(path, _read_bytes(path))


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise InvalidArgument(f"{path}: a model config must be a file") from None
    except OSError as exc:
        raise InvalidArgument(f"{path}: cannot read model config: {exc}") from None


def _parse(path: Path, raw: bytes | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        data = yaml.safe_load(raw) or {}
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"{path}: cannot read model config: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidArgument(f"{path}: a model config must be a mapping")
    return data


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """One model folder as last read. ``document`` is its parsed ``config.yaml`` (None: no
    config file, or one that could not be read: ``error`` says why)."""

    name: str
    source: Path
    builtin: bool
    kind: ModelKind
    document: dict[str, Any] | None
    error: str = ""

    @property
    def config_path(self) -> Path:
        return self.source / CONFIG_FILE

    def require_document(self) -> dict[str, Any]:
        """A copy of the document (empty when there is no config file); raises the
        InvalidArgument that reading it gave."""
        if self.error:
            raise InvalidArgument(self.error)
        return dict(self.document or {})


class ModelCatalog:
    """The model folders under ``folders`` (earlier first), each config read once.

    Safe to use from the inference threads (a model's build reads its entry) while the event
    loop scans: the cache is swapped under a lock.
    """

    def __init__(self, folders: Iterable[Path]) -> None:
        self._folders = [Path(f) for f in folders]
        self._builtin = builtin_models_dir()
        self._lock = threading.Lock()
        # source folder -> (the config's bytes, the entry read from them)
        self._cache: dict[Path, tuple[bytes | None, CatalogEntry]] = {}
        self._entries: dict[ModelKind, dict[str, CatalogEntry]] = {kind: {} for kind in ModelKind}
        self.scan()

    @property
    def folders(self) -> list[Path]:
        return list(self._folders)

    def scan(self) -> None:
        """List the folders again; read the configs that are new or changed."""
        found: dict[ModelKind, dict[str, CatalogEntry]] = {kind: {} for kind in ModelKind}
        cache: dict[Path, tuple[bytes | None, CatalogEntry]] = {}
        for folder in self._folders:
            if not folder.is_dir():
                continue
            builtin = folder == self._builtin
            for source in sorted(p for p in folder.iterdir() if p.is_dir()):
                if source.name.startswith(("_", ".")):
                    continue
                raw, entry = self._read(source, builtin)
                cache[source] = (raw, entry)
                found[entry.kind][entry.name] = entry  # a later folder overrides an earlier one
        with self._lock:
            self._cache, self._entries = cache, found

    def entries(self, kind: ModelKind) -> list[CatalogEntry]:
        """The models of ``kind`` found by the last scan, by name."""
        return sorted(self._entries[kind].values(), key=lambda e: e.name)

    def entry(self, source: Path) -> CatalogEntry:
        """The folder ``source`` as it is now: its config read again only if it changed
        since it was last read (a reload sees an edited config)."""
        builtin = source.parent == self._builtin
        raw, entry = self._read(source, builtin)
        with self._lock:
            self._cache[source] = (raw, entry)
        return entry

    def _read(self, source: Path, builtin: bool) -> tuple[bytes | None, CatalogEntry]:
        path = source / CONFIG_FILE
        document, error, raw = None, "", None
        try:
            raw = _read_bytes(path)
        except InvalidArgument as exc:
            error = exc.message
        cached = self._cache.get(source)
        if not error and cached is not None and cached[0] == raw and cached[1].builtin == builtin:
            return cached
        if not error:
            try:
                document = _parse(path, raw)
            except InvalidArgument as exc:
                error = exc.message
        kind = ModelKind.TENSOR
        if document is not None and document.get("kind") == LANGUAGE_MODEL_KIND:
            kind = ModelKind.LANGUAGE
        return raw, CatalogEntry(source.name, source, builtin, kind, document, error)
