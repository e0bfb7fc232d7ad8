"""The fast JSON adapter must agree with protobuf's own JSON mapping."""

from __future__ import annotations

import json

import pytest
from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st

from agentd.agents import Message
from agentd.errors import InvalidArgument
from agentd.gateway.agent_service import message_to_pb
from agentd.gateway.connect_json import _decode, _encode_message
from agentd.v1 import agent_pb2 as pb

_text = st.text(max_size=20)
_json_scalar = st.none() | st.booleans() | st.integers() | _text | st.floats(allow_nan=False)
_base64ish = st.sampled_from(["", "AAE=", "AAE", "_-8", "+/8=", "!!", "AAE==="])
_message = st.fixed_dictionaries(
    {},
    optional={
        "text": _text | _json_scalar,
        "data": _base64ish | _json_scalar,
        "metadata": st.dictionaries(_text, _text | st.integers(), max_size=3) | _json_scalar,
        "extra": _json_scalar,
    },
)
_request = st.fixed_dictionaries(
    {}, optional={"agent": _text | _json_scalar, "message": _message | _json_scalar, "bogus": _text}
)


def _reference(body: bytes) -> tuple[str, Message] | None:
    try:
        request = json_format.Parse(body, pb.InvokeRequest())
    except (json_format.ParseError, ValueError, TypeError):
        return None
    m = request.message
    return request.agent, Message(m.text, m.data, dict(m.metadata))


@settings(max_examples=400, deadline=None)
@given(_request)
def test_decode_agrees_with_protobuf(document):
    """What the fast path accepts, protobuf reads the same; what protobuf rejects, it rejects.

    (Python protobuf also accepts a few malformed inputs, e.g. ``"message": ""`` or the
    base64 text ``"!!"``; the fast path is stricter there, on purpose.)
    """
    body = json.dumps(document).encode()
    expected = _reference(body)
    try:
        got = _decode(body)
    except InvalidArgument:
        got = None
    if got is not None:
        assert got == expected, body
    if expected is None:
        assert got is None, body


@pytest.mark.parametrize(
    "document",
    [
        {"agent": "echo/1", "message": {"text": "hi", "data": "AAE=", "metadata": {"k": "v"}}},
        {"message": {"data": "AAE"}},
        {"message": {"data": "_-8"}},
        {"message": {"data": "+/8="}},
        {"agent": None, "message": None},
        {"message": {"text": None, "data": None, "metadata": None}},
    ],
)
def test_valid_documents_decode_like_protobuf(document):
    body = json.dumps(document).encode()
    assert _decode(body) == _reference(body)


@pytest.mark.parametrize("body", [b"", b"{", b"[]", b'"x"', b"\xff", b"{}"])
def test_decode_rejects_or_defaults(body):
    if body in (b"", b"{}"):
        assert _decode(body) == ("", Message())
    else:
        with pytest.raises(InvalidArgument, match="malformed JSON"):
            _decode(body)


@given(st.builds(Message, _text, st.binary(max_size=8), st.dictionaries(_text, _text, max_size=3)))
def test_encode_matches_protobuf(message):
    expected = json_format.MessageToDict(message_to_pb(message))
    assert _encode_message(message) == expected
