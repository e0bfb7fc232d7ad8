"""Sandboxed tools: Python functions compiled with CPython into a WebAssembly component.

``build_tools`` turns the built-in tools and ``plugins/tools/*.py`` into a precompiled,
hash-cached artefact; ``ToolService`` runs calls in fresh wasmtime instances on a thread
pool with fuel, memory, deadline and output limits.
"""

from agentd.tools.errors import ToolBuildError, ToolError, ToolErrorKind
from agentd.tools.types import CallOutcome, LoadError, ToolLimits, ToolSpec

__all__ = [
    "CallOutcome",
    "LoadError",
    "ToolBuildError",
    "ToolError",
    "ToolErrorKind",
    "ToolLimits",
    "ToolSpec",
]
