from __future__ import annotations

import pytest

from agentd.tools import ToolErrorKind, ToolSpec
from agentd.tools.schema import check_arguments, spec_problem
from tests.tools.support import raises_tool_error

SPEC = ToolSpec(
    "t",
    "",
    {
        "type": "object",
        "properties": {
            "s": {"type": "string"},
            "i": {"type": "integer", "default": 1},
            "n": {"type": "number"},
            "b": {"type": "boolean"},
            "l": {"type": "array"},
            "o": {"type": "object"},
            "any": {},
        },
        "required": ["s"],
        "additionalProperties": False,
    },
)


def test_accepts_matching_arguments():
    check_arguments(SPEC, {"s": "x", "i": 2, "n": 1.5, "b": True, "l": [], "o": {}, "any": None})
    check_arguments(SPEC, {"s": "x", "n": 3})  # an integer is a number


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ([1], "arguments must be a JSON object"),
        ({}, "missing required argument 's'"),
        ({"s": "x", "zzz": 1}, "unexpected argument 'zzz'"),
        ({"s": 1}, "argument 's' must be a string, not integer"),
        ({"s": "x", "i": True}, "argument 'i' must be an integer, not boolean"),
        ({"s": "x", "i": 1.5}, "argument 'i' must be an integer, not number"),
        ({"s": "x", "n": "1"}, "argument 'n' must be a number, not string"),
        ({"s": "x", "b": None}, "argument 'b' must be a boolean, not null"),
        ({"s": "x", "o": []}, "argument 'o' must be an object, not array"),
    ],
)
def test_rejects_with_a_message_naming_the_problem(arguments, message):
    with raises_tool_error(ToolErrorKind.INVALID_ARGUMENTS, match=message):
        check_arguments(SPEC, arguments)


def test_extra_arguments_allowed_with_kwargs():
    spec = ToolSpec("k", "", {"type": "object", "properties": {}, "additionalProperties": True})
    check_arguments(spec, {"anything": 1})


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        (ToolSpec("ok", "", {"type": "object", "properties": {}}), None),
        (ToolSpec("not an identifier", "", {"type": "object"}), "Python identifier"),
        (ToolSpec("x" * 200, "", {"type": "object"}), "Python identifier"),
        (ToolSpec("t", 5, {"type": "object"}), "description"),  # type: ignore[arg-type]
        (ToolSpec("t", "", "hijacked"), "not a JSON Schema object"),  # type: ignore[arg-type]
        (ToolSpec("t", "", {"type": "array"}), "not a JSON Schema object"),
        (ToolSpec("t", "", {"type": "object", "properties": []}), "properties"),
        (ToolSpec("t", "", {"type": "object", "properties": {"a": 1}}), "properties"),
        (ToolSpec("t", "", {"type": "object", "properties": {"a": {"type": 3}}}), "properties"),
        (ToolSpec("t", "", {"type": "object", "required": "a"}), "required"),
        (ToolSpec("t", "", {"type": "object", "additionalProperties": "yes"}), "additional"),
    ],
)
def test_specs_a_tampered_guest_reports_are_checked(spec, problem):
    # A tool file can rewrite its own guest's spec output; the host serves only sound specs.
    found = spec_problem(spec)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found
