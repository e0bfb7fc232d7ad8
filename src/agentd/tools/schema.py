"""Host-side check of tool arguments against a tool's parameter schema.

The schema is the small subset of JSON Schema the guest derives from a function signature
(``type: object``, ``properties`` with simple ``type``s, ``required``,
``additionalProperties``). Checking on the host answers bad arguments without starting an
instance; the guest checks the binding again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agentd.tools.errors import ToolArgumentsInvalid
from agentd.tools.types import ToolSpec

__all__ = ["check_arguments"]

_CHECKS = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


def check_arguments(spec: ToolSpec, arguments: Any) -> None:
    """Raise ToolArgumentsInvalid naming the first problem with ``arguments``."""
    if not isinstance(arguments, Mapping):
        raise ToolArgumentsInvalid(f"tool {spec.name!r}: arguments must be a JSON object")
    schema = spec.parameters
    properties: dict[str, Any] = schema.get("properties", {})
    for name in schema.get("required", ()):
        if name not in arguments:
            raise ToolArgumentsInvalid(f"tool {spec.name!r}: missing required argument {name!r}")
    for name, value in arguments.items():
        prop = properties.get(name)
        if prop is None:
            if not schema.get("additionalProperties", False):
                known = ", ".join(properties) or "none"
                raise ToolArgumentsInvalid(
                    f"tool {spec.name!r}: unexpected argument {name!r} (takes: {known})"
                )
            continue
        kind = prop.get("type")
        check = _CHECKS.get(kind) if kind else None
        if check is not None and not check(value):
            raise ToolArgumentsInvalid(
                f"tool {spec.name!r}: argument {name!r} must be {_article(kind)} {kind}, "
                f"not {_json_type(value)}"
            )


def _article(kind: str) -> str:
    return "an" if kind[0] in "aeiou" else "a"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    for kind in ("boolean", "integer", "number", "string", "array", "object"):
        if _CHECKS[kind](value):
            return kind
    return type(value).__name__
