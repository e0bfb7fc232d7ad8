"""Shared by the tool tests and the tools API integration test: one build per session."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentd.tools.build import ToolArtefact, build_tools
from agentd.tools.errors import ToolError, ToolErrorKind
from agentd.tools.types import ToolLimits

PLUGINS = Path(__file__).parent / "plugins"

# Tight limits keep hostile tests short: ~0.1-0.3 s of CPU, 256 MiB, 2 s, 64 KiB out.
LIMITS = ToolLimits(
    max_fuel=1_000_000_000,
    max_memory_bytes=256 * 1024 * 1024,
    timeout_s=2.0,
    max_output_bytes=64 * 1024,
    max_input_bytes=64 * 1024,
)


def cache_dir(factory: pytest.TempPathFactory | None = None) -> Path:
    # The cache servers use (AGENTD_TOOLS_CACHE_DIR or the default), which `make test`
    # fills before the suite runs: each component compiles in ~10-25 s, and the built-in
    # tools' component is the same for every plugin folder.
    from agentd.settings import Settings

    return Settings().tools_cache_dir


def session_artefact(factory: pytest.TempPathFactory) -> ToolArtefact:
    return build_tools(cache_dir(factory), PLUGINS / "tools").artefact


@contextlib.contextmanager
def raises_tool_error(
    kind: ToolErrorKind, match: str | None = None
) -> Iterator[pytest.ExceptionInfo[ToolError]]:
    """``pytest.raises(ToolError, match=match)`` that also checks the error's kind."""
    with pytest.raises(ToolError, match=match) as caught:
        yield caught
    assert caught.value.kind is kind, caught.value


def is_tool_error(value: object, *kinds: ToolErrorKind) -> bool:
    """Whether ``value`` is a ToolError of one of ``kinds``."""
    return isinstance(value, ToolError) and value.kind in kinds
