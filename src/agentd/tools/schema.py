"""Host-side check of tool arguments against a tool's parameter schema.

The schema is the small subset of JSON Schema the guest derives from a function signature
(``type: object``, ``properties`` with simple ``type``s, ``required``,
``additionalProperties``). Checking on the host answers bad arguments without starting an
instance; the guest checks the binding again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agentd.tools.errors import ToolError, ToolErrorKind
from agentd.tools.types import ToolSpec

__all__ = ["check_arguments", "spec_problem"]

_CHECKS = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


def check_arguments(spec: ToolSpec, arguments: Any) -> None:
    """Raise ToolError (``invalid_arguments``) naming the first problem with ``arguments``."""
    if not isinstance(arguments, Mapping):
        raise ToolError(
            ToolErrorKind.INVALID_ARGUMENTS, f"tool {spec.name!r}: arguments must be a JSON object"
        )
    schema = spec.parameters
    properties: dict[str, Any] = schema.get("properties", {})
    for name in schema.get("required", ()):
        if name not in arguments:
            raise ToolError(
                ToolErrorKind.INVALID_ARGUMENTS,
                f"tool {spec.name!r}: missing required argument {name!r}",
            )
    for name, value in arguments.items():
        prop = properties.get(name)
        if prop is None:
            if not schema.get("additionalProperties", False):
                known = ", ".join(properties) or "none"
                raise ToolError(
                    ToolErrorKind.INVALID_ARGUMENTS,
                    f"tool {spec.name!r}: unexpected argument {name!r} (takes: {known})",
                )
            continue
        kind = prop.get("type")
        check = _CHECKS.get(kind) if kind else None
        if check is not None and not check(value):
            raise ToolError(
                ToolErrorKind.INVALID_ARGUMENTS,
                f"tool {spec.name!r}: argument {name!r} must be {_article(kind)} {kind}, "
                f"not {_json_type(value)}",
            )


_MAX_NAME = 128
_MAX_DESCRIPTION = 16 * 1024


def spec_problem(spec: ToolSpec) -> str | None:
    """What is wrong with a tool spec a component reported, or None.

    The guest derives specs from signatures, but a tool file can tamper with its own guest,
    so the host checks the shape it relies on before serving the tool.
    """
    name, params = spec.name, spec.parameters
    if not isinstance(name, str) or not name.isidentifier() or len(name) > _MAX_NAME:
        return f"a tool name must be a Python identifier of at most {_MAX_NAME} characters"
    if not isinstance(spec.description, str) or len(spec.description) > _MAX_DESCRIPTION:
        return f"tool {name!r}: the description must be text of at most {_MAX_DESCRIPTION:,} chars"
    if not isinstance(params, dict) or params.get("type") != "object":
        return f"tool {name!r}: the parameter schema is not a JSON Schema object"
    properties = params.get("properties", {})
    if not isinstance(properties, dict) or not all(
        isinstance(key, str) and isinstance(value, dict) and isinstance(value.get("type", ""), str)
        for key, value in properties.items()
    ):
        return f"tool {name!r}: the schema's properties are not a map of named schemas"
    required = params.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        return f"tool {name!r}: the schema's required list is not a list of names"
    if not isinstance(params.get("additionalProperties", False), bool):
        return f"tool {name!r}: the schema's additionalProperties is not true or false"
    return None


def _article(kind: str) -> str:
    return "an" if kind[0] in "aeiou" else "a"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    for kind in ("boolean", "integer", "number", "string", "array", "object"):
        if _CHECKS[kind](value):
            return kind
    return type(value).__name__
