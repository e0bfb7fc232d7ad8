"""Agent types by name: the built-ins plus those loaded from a plugin folder."""

from __future__ import annotations

import importlib.util
import inspect
import logging
import re
import sys
from pathlib import Path
from types import ModuleType

from agentd.agents.base import Agent
from agentd.errors import InvalidArgument, NotFound

__all__ = ["AgentRegistry"]

log = logging.getLogger(__name__)
_NAME = re.compile(r"[a-z][a-z0-9_-]{0,63}")


class AgentRegistry:
    """Maps agent type names to classes. An instance, never a global."""

    def __init__(self) -> None:
        self._types: dict[str, type[Agent]] = {}

    def register(self, agent_type: type[Agent]) -> None:
        name = agent_type.name
        if not _NAME.fullmatch(name or ""):
            raise InvalidArgument(
                f"agent class {agent_type.__qualname__} needs a name matching {_NAME.pattern}"
            )
        self._types[name] = agent_type

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
                module = _import_file(path)
                names = self._register_module(module, path)
            except BaseException:  # SystemExit and the like included: see above
                log.exception("agent plugin %s failed to load; skipped", path)
                self._types = before  # none of the file's types, not some of them
                sys.modules.pop(_module_name(path), None)
                continue
            loaded.extend(names)
        log.info(
            "agent plugins from %s: %s", directory.resolve(), ", ".join(loaded) or "none loaded"
        )
        return loaded

    def _register_module(self, module: ModuleType, path: Path) -> list[str]:
        """Register the Agent subclasses defined in ``module``; their names."""
        loaded: list[str] = []
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, Agent) and obj is not Agent and obj.__module__ == module.__name__:
                replaced = self._types.get(obj.name)
                try:
                    self.register(obj)
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


def _module_name(path: Path) -> str:
    return f"agentd_plugins.agents.{path.stem}"


def _import_file(path: Path):
    module_name = _module_name(path)
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise InvalidArgument(f"agent plugin {path} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module
