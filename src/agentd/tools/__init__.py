"""Sandboxed tools: Python functions compiled with CPython into a WebAssembly component.

``build_tools`` turns the built-in tools and ``plugins/tools/*.py`` into a precompiled,
hash-cached artefact; ``ToolService`` runs calls in fresh wasmtime instances on a thread
pool with fuel, memory, deadline and output limits.
"""

from agentd.tools.errors import (
    ToolArgumentsInvalid,
    ToolBuildError,
    ToolCallFailed,
    ToolCrashed,
    ToolDeadlineExceeded,
    ToolError,
    ToolInputTooLarge,
    ToolNotFound,
    ToolOutOfFuel,
    ToolOutOfMemory,
    ToolOutputTooLarge,
    ToolQueueFull,
    ToolResultInvalid,
    ToolStackOverflow,
    ToolsUnavailable,
)
from agentd.tools.types import CallOutcome, LoadError, ToolLimits, ToolSpec

__all__ = [
    "CallOutcome",
    "LoadError",
    "ToolArgumentsInvalid",
    "ToolBuildError",
    "ToolCallFailed",
    "ToolCrashed",
    "ToolDeadlineExceeded",
    "ToolError",
    "ToolInputTooLarge",
    "ToolLimits",
    "ToolNotFound",
    "ToolOutOfFuel",
    "ToolOutOfMemory",
    "ToolOutputTooLarge",
    "ToolQueueFull",
    "ToolResultInvalid",
    "ToolSpec",
    "ToolStackOverflow",
    "ToolsUnavailable",
]
