"""The one error tree: every public error is an AgentdError with a code; tool kinds map to
the codes docs/tools.md documents."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest

import agentd.errors
import agentd.server
from agentd.errors import (
    AgentdError,
    Code,
    ConfigError,
    InvalidArgument,
    StartupError,
    Unavailable,
)
from agentd.tools import ToolBuildError, ToolError, ToolErrorKind

DOCS = Path(__file__).resolve().parents[2] / "docs"


def public_errors() -> list[type[BaseException]]:
    modules = [agentd.errors, agentd.tools, agentd.server]
    found = []
    for module in modules:
        for name in module.__all__:
            value = getattr(module, name)
            if isinstance(value, type) and issubclass(value, BaseException):
                found.append(value)
    return found


@pytest.mark.parametrize("error", public_errors(), ids=lambda e: e.__qualname__)
def test_every_public_error_is_in_the_tree_with_a_code(error):
    assert issubclass(error, AgentdError)
    assert isinstance(error.code, Code)


def test_each_code_class_carries_its_own_code():
    # The code classes; ConfigError and the like refine one of them.
    classes = [c for c in AgentdError.__subclasses__() if c.__module__ == "agentd.errors"]
    codes = [cls.code for cls in classes]
    assert len(codes) == len(set(codes)), "two classes share a code"
    assert {cls.__name__ for cls in classes} >= {"Unimplemented", "Unavailable", "Internal"}


def test_start_up_and_config_errors_refine_a_code_class():
    assert issubclass(ConfigError, InvalidArgument) and ConfigError.code is Code.INVALID_ARGUMENT
    assert issubclass(StartupError, Unavailable) and StartupError.code is Code.UNAVAILABLE


def documented_tool_kinds() -> dict[str, str]:
    """kind label -> gRPC code name, from the table in docs/tools.md."""
    rows = re.findall(
        r"^\| [^|]+ \| `([A-Z_]+)` \| ([A-Z_]+) \| \d+ \| `([a-z_]+)` \|$",
        (DOCS / "tools.md").read_text(encoding="utf-8"),
        flags=re.M,
    )
    assert rows, "the error table in docs/tools.md was not found"
    for member, _, label in rows:
        assert ToolErrorKind[member].value == label
    return {label: code for _, code, label in rows}


def test_tool_kinds_map_to_the_documented_codes():
    documented = documented_tool_kinds()
    assert set(documented) == {kind.value for kind in ToolErrorKind}
    for kind in ToolErrorKind:
        error = ToolError(kind, f"tool 'x': {kind}")
        assert error.code is kind.code is Code[documented[kind.value]], kind
        assert error.kind is kind and error.message == f"tool 'x': {kind}"
        assert isinstance(error, AgentdError)


def test_the_tool_raised_is_unknown():
    assert ToolError(ToolErrorKind.RAISED, "tool 'x' raised ValueError: no").code is Code.UNKNOWN


def test_tool_error_kind_is_its_metrics_label():
    assert ToolErrorKind.OUT_OF_FUEL == "out_of_fuel"
    assert str(ToolErrorKind.DEADLINE) == "deadline"


def test_tool_error_survives_pickling():
    error = ToolError(ToolErrorKind.QUEUE_FULL, "too many tool calls in flight (4)")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.kind, copy.code, copy.message) == (error.kind, error.code, error.message)
    assert repr(copy) == "ToolError(ToolErrorKind.QUEUE_FULL, 'too many tool calls in flight (4)')"


def test_tool_build_error_is_a_failed_precondition():
    assert ToolBuildError("x").code is Code.FAILED_PRECONDITION
