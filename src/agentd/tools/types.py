"""Plain data the tool layers exchange: specs, limits, call outcomes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agentd.tools.errors import ToolError

__all__ = ["CallOutcome", "LoadError", "ToolLimits", "ToolSpec"]


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A tool as clients see it: name, description, JSON Schema of its arguments."""

    name: str
    description: str
    parameters: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


@dataclass(frozen=True, slots=True)
class LoadError:
    """A tool file that failed to load at build time (its tools are missing)."""

    file: str
    message: str


@dataclass(frozen=True, slots=True)
class ToolLimits:
    """Per-call limits. Fuel is wasmtime's instruction budget (~1e9 is ~0.1 s of CPU here)."""

    max_fuel: int = 5_000_000_000
    max_memory_bytes: int = 128 * 1024 * 1024
    timeout_s: float = 5.0
    max_output_bytes: int = 1024 * 1024
    max_input_bytes: int = 1024 * 1024


@dataclass(frozen=True, slots=True)
class CallOutcome:
    """What one sandboxed call produced: a JSON result or an error, and the fuel it used."""

    result_json: str | None
    error: ToolError | None
    fuel_used: int
