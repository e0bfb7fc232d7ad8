"""The tool runtime of a node: one sandbox per component, each call routed by tool name.

Implements the service's ``ToolRuntime`` over a :class:`ToolArtefact`. A tool runs only in
the component of the file that defined it, so what one tool file does to its interpreter
(patching modules, replacing functions, undoing the guest's seals) stays in its own
WebAssembly memory and cannot change what another file's tools answer.
"""

from __future__ import annotations

from agentd.tools.build import ToolArtefact
from agentd.tools.errors import ToolError, ToolErrorKind
from agentd.tools.sandbox import SandboxEngine, WasmSandbox
from agentd.tools.types import CallOutcome, ToolLimits

__all__ = ["ComponentSet", "open_components"]


class ComponentSet:
    """Owns a :class:`WasmSandbox` per component and the engine they share; ``close`` frees
    them all."""

    def __init__(
        self, artefact: ToolArtefact, sandboxes: dict[int, WasmSandbox], engine: SandboxEngine
    ) -> None:
        self._engine = engine
        self._sandboxes = list(sandboxes.values())
        self._routes = {name: sandboxes[index] for name, index in artefact.owners.items()}

    def call(self, name: str, arguments_json: str, *, deadline: float | None = None) -> CallOutcome:
        sandbox = self._routes.get(name)
        if sandbox is None:
            return CallOutcome(
                None, ToolError(ToolErrorKind.NOT_FOUND, f"no tool named {name!r}"), 0
            )
        return sandbox.call(name, arguments_json, deadline=deadline)

    def refill(self) -> None:
        for sandbox in self._sandboxes:
            sandbox.refill()

    def close(self) -> None:
        for sandbox in self._sandboxes:
            sandbox.close()
        self._engine.close()


def open_components(
    artefact: ToolArtefact, limits: ToolLimits, *, pool_size: int = 0, threads: int = 4
) -> ComponentSet:
    """Load every component of ``artefact`` on one engine sized for ``threads`` calls at
    once and ``pool_size`` prepared instances per component (raises ToolError ``unavailable`` if one
    cannot load; what was loaded is closed)."""
    built = [i for i, component in enumerate(artefact.components) if not component.failed]
    engine = SandboxEngine.for_node(
        limits, threads=threads, pool_size=pool_size, components=len(built)
    )
    sandboxes: dict[int, WasmSandbox] = {}
    try:
        for index in built:  # a file that broke its own build has no component
            path = artefact.components[index].component_path
            sandboxes[index] = WasmSandbox(path, limits, pool_size=pool_size, engine=engine)
    except BaseException:
        for sandbox in sandboxes.values():
            sandbox.close()
        engine.close()
        raise
    return ComponentSet(artefact, sandboxes, engine)
