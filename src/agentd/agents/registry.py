"""Agent types by name: the built-ins plus those loaded from a plugin folder."""

from __future__ import annotations

import hashlib
import inspect
import logging
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from agentd.agents.base import Agent
from agentd.errors import InvalidArgument, NotFound

__all__ = ["AgentRegistry", "PluginFile", "agent_classes", "check_name", "import_plugin"]

log = logging.getLogger(__name__)
_NAME = re.compile(r"[a-z][a-z0-9_-]{0,63}")


@dataclass(frozen=True, slots=True)
class PluginFile:
    """The version of one plugin file that serves: its module, content version (SHA-256
    or the verifier's), the agent type names it registered and when it was loaded."""

    module: str
    version: str
    names: tuple[str, ...]
    loaded_at: float


class AgentRegistry:
    """Maps agent type names to classes. An instance, never a global."""

    def __init__(self) -> None:
        self._types: dict[str, type[Agent]] = {}
        # Types registered in code (the built-ins): a plugin may override one of these names,
        # and the type comes back when that plugin stops defining it.
        self._base: dict[str, type[Agent]] = {}
        # Plugin files loaded, by resolved path (for reloads and status).
        self.files: dict[Path, PluginFile] = {}

    def register(self, agent_type: type[Agent]) -> None:
        """Register a type in code (a built-in); a plugin file may override its name."""
        self._add(agent_type)
        self._base[agent_type.name] = agent_type

    def _add(self, agent_type: type[Agent]) -> None:
        check_name(agent_type)
        self._types[agent_type.name] = agent_type

    def get(self, name: str) -> type[Agent]:
        try:
            return self._types[name]
        except KeyError:
            raise NotFound(f"unknown agent type {name!r}") from None

    def names(self) -> list[str]:
        return sorted(self._types)

    def __contains__(self, name: object) -> bool:
        return name in self._types

    def load_directory(self, directory: Path) -> list[str]:
        """Import every ``*.py`` in ``directory`` and register its Agent subclasses.

        A file that fails to import or register is logged and skipped; the others still
        load. That includes files that raise SystemExit, KeyboardInterrupt or any other
        BaseException: a plugin file must not stop the server from starting.
        Returns the names registered.
        """
        loaded: list[str] = []
        if not directory.is_dir():
            log.info("agent plugins: %s does not exist; none loaded", directory.resolve())
            return loaded
        for path in sorted(directory.glob("*.py")):
            before = dict(self._types)
            try:
                source = path.read_bytes()
                module = import_plugin(path, source, _module_name(path))
                names = self._register_module(module, path)
            except BaseException:  # SystemExit and the like included: see above
                log.exception("agent plugin %s failed to load; skipped", path)
                self._types = before  # none of the file's types, not some of them
                sys.modules.pop(_module_name(path), None)
                continue
            version = hashlib.sha256(source).hexdigest()
            for name in names:
                # What a later version's migrate_state is told it migrates from.
                self._types[name]._plugin_version = version  # type: ignore[attr-defined]
            self.files[path.resolve()] = PluginFile(
                module.__name__, version, tuple(names), time.time()
            )
            loaded.extend(names)
        log.info(
            "agent plugins from %s: %s", directory.resolve(), ", ".join(loaded) or "none loaded"
        )
        return loaded

    def swap_file(
        self, path: Path, module: str, version: str, types: Sequence[type[Agent]]
    ) -> PluginFile | None:
        """Make ``types`` (a new version of plugin file ``path``, imported as ``module``)
        the current types of their names, and remove the names the file's previous version
        had and this one has not: one assignment of the name -> type mapping, so a lookup
        sees the old set or the new one, never a mix. The types replaced are marked (their
        instances move to the current type before their next turn). Returns the previous
        version's record (its module is the caller's to release), None if there was none.
        """
        for agent_type in types:
            check_name(agent_type)
        key = path.resolve()
        previous = self.files.get(key)
        current = self._without(previous)
        for agent_type in types:
            agent_type._replaced = False  # its own flag: not one inherited from a replaced base
            agent_type._plugin_version = version  # type: ignore[attr-defined]
            current[agent_type.name] = agent_type
        self._commit(current)
        self.files[key] = PluginFile(module, version, tuple(t.name for t in types), time.time())
        return previous

    def remove_file(self, path: Path) -> PluginFile | None:
        """Remove the agent types plugin file ``path`` registered (the file was deleted):
        running turns finish; later calls get NOT_FOUND. Returns its record, if any."""
        previous = self.files.pop(path.resolve(), None)
        if previous is not None:
            self._commit(self._without(previous))
        return previous

    def _without(self, previous: PluginFile | None) -> dict[str, type[Agent]]:
        """The types with those of ``previous`` (a plugin file's version) taken out: a
        name it took from a built-in goes back to the built-in."""
        current = dict(self._types)
        if previous is None:
            return current
        for name in previous.names:
            # (Unless another file has registered that name since.)
            if name in current and current[name].__module__ == previous.module:
                base = self._base.get(name)
                if base is None:
                    del current[name]
                else:
                    base._replaced = False  # serving again: its instances stay on it
                    current[name] = base
        return current

    def _commit(self, types: dict[str, type[Agent]]) -> None:
        old, self._types = self._types, types
        for name, agent_type in old.items():
            if types.get(name) is not agent_type:
                agent_type._replaced = True

    def _register_module(self, module: ModuleType, path: Path) -> list[str]:
        """Register the Agent subclasses defined in ``module``; their names."""
        loaded: list[str] = []
        for obj in agent_classes(module):
            replaced = self._types.get(obj.name)
            try:
                self._add(obj)
            except InvalidArgument as exc:
                log.error("agent plugin %s: %s", path, exc.message)
                continue
            if replaced is not None and replaced is not obj:
                log.warning(
                    "agent plugin %s: %s replaces the agent type %r registered before (%s)",
                    path,
                    obj.__qualname__,
                    obj.name,
                    f"{replaced.__module__}.{replaced.__qualname__}",
                )
            loaded.append(obj.name)
        return loaded


def check_name(agent_type: type[Agent]) -> None:
    """InvalidArgument unless the type's ``name`` is a valid agent type name."""
    if not _NAME.fullmatch(agent_type.name or ""):
        raise InvalidArgument(
            f"agent class {agent_type.__qualname__} needs a name matching {_NAME.pattern}"
        )


def _module_name(path: Path) -> str:
    return f"agentd_plugins.agents.{path.stem}"


def agent_classes(module: ModuleType) -> list[type[Agent]]:
    """The Agent subclasses ``module`` defines (not those it imports)."""
    return [
        obj
        for _, obj in inspect.getmembers(module, inspect.isclass)
        if issubclass(obj, Agent) and obj is not Agent and obj.__module__ == module.__name__
    ]


def import_plugin(path: Path, source: bytes, module_name: str) -> ModuleType:
    """Run ``source`` (the bytes read from ``path``) as a new module ``module_name``, left
    in ``sys.modules`` (dataclasses and pickle look their module up there).

    Compiled from these bytes, not through the import system: the bytes that were hashed
    (and verified) are the ones that run, and no bytecode cache is read or written (its
    timestamp check could run an older version written within the same second).
    """
    module = ModuleType(module_name)
    module.__file__ = str(path)
    sys.modules[module_name] = module
    try:
        code = compile(source, str(path), "exec", dont_inherit=True)
        exec(code, module.__dict__)  # running the plugin is the point
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module
