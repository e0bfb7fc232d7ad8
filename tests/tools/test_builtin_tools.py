"""The built-in tools: logic on the host (fast), then the same calls inside the sandbox."""

from __future__ import annotations

import json
import re

import pytest

from agentd.tools import ToolError, ToolErrorKind
from agentd.tools.builtin.calc import calc
from agentd.tools.builtin.text import text_stats


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("2 ** 10", 1024),
        ("7 / 2", 3.5),
        ("7 // 2", 3),
        ("-7 % 3", 2),
        ("-(2.5)", -2.5),
        ("sqrt(16) + abs(-1)", 5.0),
        ("max(1, 5, 3) - min(4, 2)", 3),
        ("round(pi, 2)", 3.14),
        ("floor(2.7) + ceil(2.1)", 5),
    ],
)
def test_calc_arithmetic(expression, value):
    assert calc(expression) == value


@pytest.mark.parametrize(
    ("expression", "error", "text"),
    [
        ("__import__('os')", ValueError, "unknown function '__import__'"),
        ("__import__('os').system('ls')", ValueError, "unsupported syntax: Call"),
        ("open('/etc/passwd')", ValueError, "unknown function 'open'"),
        ("(1).__class__", ValueError, "unsupported syntax: Attribute"),
        ("x + 1", ValueError, "unknown name 'x'"),
        ("'a' * 3", ValueError, "unsupported constant"),
        ("[1, 2]", ValueError, "unsupported syntax: List"),
        ("lambda: 1", ValueError, "unsupported syntax: Lambda"),
        ("9 ** 9 ** 9", ValueError, "exponent"),
        ("2 ** 5000", ValueError, "more than 4096 bits"),
        ("1 +", ValueError, "not an arithmetic expression"),
        ("1 / 0", ZeroDivisionError, "division by zero"),
        ("1" * 1001, ValueError, "longer than 1000"),
    ],
)
def test_calc_refuses(expression, error, text):
    with pytest.raises(error, match=re.escape(text)):
        calc(expression)


def test_text_stats_counts():
    stats = text_stats("The cat sat. The cat ran!\n\nA dog? Yes.", top=2)
    assert stats["words"] == 9
    assert stats["unique_words"] == 7
    assert stats["sentences"] == 4
    assert stats["paragraphs"] == 2
    assert stats["lines"] == 3
    assert stats["top_words"] == [["the", 2], ["cat", 2]]
    words = ["The", "cat", "sat", "The", "cat", "ran", "A", "dog", "Yes"]
    assert stats["average_word_length"] == round(sum(map(len, words)) / 9, 2)


def test_text_stats_empty_and_bad_top():
    assert text_stats("")["words"] == 0
    with pytest.raises(ValueError, match="top"):
        text_stats("a", top=-1)


def test_builtins_run_in_the_sandbox(sandbox):
    assert json.loads(sandbox.call("calc", '{"expression": "6 * 7"}').result_json) == 42
    out = sandbox.call("text_stats", json.dumps({"text": "one two two", "top": 1}))
    assert json.loads(out.result_json)["top_words"] == [["two", 2]]
    assert out.fuel_used > 0


def test_calc_error_is_a_tool_error_with_its_message(sandbox):
    error = sandbox.call("calc", '{"expression": "1/0"}').error
    assert isinstance(error, ToolError) and error.kind is ToolErrorKind.RAISED
    assert error.message == "tool 'calc' raised ZeroDivisionError: division by zero"
