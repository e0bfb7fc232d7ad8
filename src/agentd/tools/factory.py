"""The tool service a node runs, built from settings (the sandbox is imported lazily)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from agentd.tools.build import find_artefact
from agentd.tools.service import ToolObserver, ToolRuntime, ToolService
from agentd.tools.types import ToolLimits

if TYPE_CHECKING:
    from agentd.settings import Settings

__all__ = ["open_tool_service", "tool_limits"]


def tool_limits(settings: Settings) -> ToolLimits:
    return ToolLimits(
        max_fuel=settings.tool_max_fuel,
        max_memory_bytes=settings.tool_max_memory_bytes,
        timeout_s=settings.tool_timeout_s,
        max_output_bytes=settings.tool_max_output_bytes,
        max_input_bytes=settings.tool_max_input_bytes,
    )


def open_tool_service(settings: Settings, observer: ToolObserver | None = None) -> ToolService:
    """The service over the cached artefact for the built-in and ``plugins/tools`` files.

    Never builds (``agentd serve`` and ``agentd tools build`` do, before the server starts):
    without an artefact the service lists no tools and calls get UNAVAILABLE.
    """
    limits = tool_limits(settings)
    common = {
        "limits": limits,
        "threads": settings.tool_threads,
        "max_queued": settings.max_queued_tool_calls,
        "max_running_per_tool": settings.tool_max_running_per_tool,
        "max_queued_per_tool": settings.tool_max_queued_per_tool,
        "max_total_memory_bytes": settings.tool_max_total_memory_bytes,
        "observer": observer,
    }
    artefact = find_artefact(settings.tools_cache_dir, settings.plugins / "tools")
    if artefact is None:
        return ToolService(
            [],
            None,
            unavailable_reason=(
                "the tool component for these tool files is not built; run `agentd tools build`"
            ),
            **common,  # type: ignore[arg-type]
        )

    def open_runtime() -> ToolRuntime:
        from agentd.tools.components import open_components

        return open_components(
            artefact, limits, pool_size=settings.tool_pool_size, threads=settings.tool_threads
        )

    return ToolService(artefact.tools, open_runtime, **common)  # type: ignore[arg-type]
