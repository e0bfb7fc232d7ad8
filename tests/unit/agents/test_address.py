import pytest

from agentd.agents import Address, parse_address
from agentd.errors import InvalidArgument


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("echo", Address("echo", "default")),
        ("echo/42", Address("echo", "42")),
        ("my-agent_2/user@example.com", Address("my-agent_2", "user@example.com")),
        ("t/a.b:c-d", Address("t", "a.b:c-d")),
    ],
)
def test_parse_valid(text, expected):
    assert parse_address(text) == expected
    assert str(expected) == f"{expected.type}/{expected.id}"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "/x",
        "Echo",
        "1abc",
        "echo/",
        "echo/a/b",
        "echo/ x",
        "echo/-x",
        "a" * 65,
        "e/" + "x" * 129,
    ],
)
def test_parse_invalid_names_the_problem(text):
    with pytest.raises(InvalidArgument, match="malformed agent address"):
        parse_address(text)
