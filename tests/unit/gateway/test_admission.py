import gzip
import struct
import zlib

import pytest
from connectrpc.code import Code as ConnectCode
from connectrpc.errors import ConnectError

from agentd.agents.address import parse_address
from agentd.errors import InvalidArgument
from agentd.gateway.admission import (
    BodyTooLarge,
    InflatedTooLarge,
    TokenCheck,
    UnsupportedEncoding,
    buffer_body,
    framed_receive,
    inflate,
    replay,
)
from agentd.gateway.protocol import Protocol, clip
from agentd.gateway.rpc_errors import BoundedGzip, check_grpc_headers, check_grpc_timeout


def test_token_check():
    check = TokenCheck(["abc", "def"])
    assert check.enabled
    assert check.allows(b"Bearer abc")
    assert check.allows(b"bearer def")
    assert not check.allows(None)
    assert not check.allows(b"Bearer abcd")
    assert not check.allows(b"abc")
    assert TokenCheck([]).allows(None)


def _receiver(chunks):
    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    return receive


async def test_buffer_body_joins_chunks_and_enforces_limit():
    body, disconnected = await buffer_body(_receiver([b"ab", b"cd"]), 4)
    assert (body, disconnected) == (b"abcd", False)
    with pytest.raises(BodyTooLarge):
        await buffer_body(_receiver([b"ab", b"cde"]), 4)


async def test_replay_yields_body_once():
    receive = replay(b"xyz", _receiver([]))
    assert (await receive())["body"] == b"xyz"
    assert (await receive())["type"] == "http.disconnect"


def test_inflate_gzip_deflate_identity_and_refusals():
    raw = b'{"a": 1}'
    assert inflate(raw, None, 100) == raw
    assert inflate(raw, b"identity", 100) == raw
    assert inflate(gzip.compress(raw), b"GZip", 100) == raw
    assert inflate(zlib.compress(raw), b"deflate", 100) == raw
    with pytest.raises(UnsupportedEncoding, match="'br'"):
        inflate(raw, b"br", 100)
    with pytest.raises(InvalidArgument, match="malformed gzip body"):
        inflate(raw, b"gzip", 100)
    with pytest.raises(InvalidArgument, match="malformed gzip body: truncated"):
        inflate(gzip.compress(raw)[:-6], b"gzip", 100)
    with pytest.raises(InflatedTooLarge):
        inflate(gzip.compress(b" " * 10_000), b"gzip", 100)
    # Several gzip members are one body (as gzip.decompress reads them), still bounded.
    assert inflate(gzip.compress(b"ab") + gzip.compress(b"cd"), b"gzip", 100) == b"abcd"
    with pytest.raises(InflatedTooLarge):
        inflate(gzip.compress(b"x" * 60) + gzip.compress(b"y" * 60), b"gzip", 100)
    with pytest.raises(InvalidArgument, match="malformed gzip body"):
        inflate(gzip.compress(raw) + b"junk", b"gzip", 100)
    with pytest.raises(InvalidArgument, match="after the end"):
        inflate(zlib.compress(raw) + b"junk", b"deflate", 100)


def test_bounded_gzip_reports_bad_bodies_as_client_errors():
    codec = BoundedGzip(100)
    assert codec.name() == "gzip"
    assert codec.decompress(codec.compress(b"hello")) == b"hello"
    with pytest.raises(ConnectError) as caught:
        codec.decompress(b"not gzip")
    assert caught.value.code is ConnectCode.INVALID_ARGUMENT
    with pytest.raises(ConnectError) as caught:
        codec.decompress(gzip.compress(b"x" * 1000))
    assert caught.value.code is ConnectCode.RESOURCE_EXHAUSTED


def _frame(payload: bytes) -> bytes:
    return struct.pack(">BI", 0, len(payload)) + payload


async def _drain(receive):
    while (message := await receive())["type"] == "http.request" and message["more_body"]:
        pass


@pytest.mark.parametrize(
    "chunks",
    [
        [_frame(b"abc")],
        [_frame(b"abc")[:2], _frame(b"abc")[2:6], _frame(b"abc")[6:]],
        [_frame(b""), _frame(b"xy")],
    ],
)
async def test_framed_receive_passes_whole_frames(chunks):
    await _drain(framed_receive(_receiver(chunks), 1000, unary=True, encoded=False))


@pytest.mark.parametrize(
    ("chunks", "unary", "fragment"),
    [
        ([_frame(b"abc")[:-1]], True, "truncated"),
        ([_frame(b"abc")[:3]], False, "truncated"),
        ([_frame(b"a"), _frame(b"abc")[:4]], True, "truncated"),
        ([b""], True, "no message"),
    ],
)
async def test_framed_receive_refuses_broken_framing(chunks, unary, fragment):
    with pytest.raises(ConnectError, match=fragment) as caught:
        await _drain(framed_receive(_receiver(chunks), 1000, unary=unary, encoded=False))
    assert caught.value.code is ConnectCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("flags", "encoded", "fragment"),
    [(1, False, "flagged compressed"), (2, True, "flags 0x02"), (0x80, False, "flags 0x80")],
)
async def test_framed_receive_refuses_flags_the_request_cannot_set(flags, encoded, fragment):
    # connect-python answered a compressed flag without an encoding with INTERNAL.
    frame = struct.pack(">BI", flags, 3) + b"abc"
    with pytest.raises(ConnectError, match=fragment) as caught:
        await _drain(framed_receive(_receiver([frame]), 1000, unary=True, encoded=encoded))
    assert caught.value.code is ConnectCode.INVALID_ARGUMENT
    compressed = struct.pack(">BI", 1, 3) + b"abc"
    await _drain(framed_receive(_receiver([compressed]), 1000, unary=True, encoded=True))


async def test_framed_receive_allows_an_empty_request_stream_and_bounds_size():
    await _drain(framed_receive(_receiver([b""]), 1000, unary=False, encoded=False))
    with pytest.raises(ConnectError) as caught:
        await _drain(framed_receive(_receiver([_frame(b"x" * 20)]), 10, unary=True, encoded=False))
    assert caught.value.code is ConnectCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("value", [None, b"", b"1H", b"99999999n", b"0S", b"250m"])
def test_grpc_timeout_well_formed(value):
    assert check_grpc_timeout(value) is None


@pytest.mark.parametrize("value", [b"abc", b"999999999S", b"5", b"-1S", b"1.5S", b" 5S", b"5s"])
def test_grpc_timeout_malformed(value):
    problem = check_grpc_timeout(value)
    assert problem is not None and "grpc-timeout" in problem


def test_clip_and_address_errors_stay_short():
    assert clip("short") == "short"
    assert clip("x" * 1000) == "x" * 100 + "\u2026"
    with pytest.raises(InvalidArgument) as caught:
        parse_address("A" * 1_000_000)
    assert len(caught.value.message) < 300 and "\u2026" in caught.value.message
    with pytest.raises(InvalidArgument) as caught:
        parse_address("echo/" + "#" * 1_000_000)
    assert len(caught.value.message) < 300


@pytest.mark.parametrize(
    ("protocol", "te", "refused"),
    [
        (Protocol.GRPC, None, True),
        (Protocol.GRPC, b"gzip", True),
        (Protocol.GRPC, b"trailers", False),
        (Protocol.GRPC, b"Trailers, deflate", False),
        (Protocol.GRPC_WEB, None, False),  # gRPC-Web carries its trailers in the body
    ],
)
def test_grpc_needs_te_trailers(protocol, te, refused):
    headers = [(b"content-type", b"application/grpc")]
    if te is not None:
        headers.append((b"te", te))
    problem = check_grpc_headers({"headers": headers}, protocol)
    assert (problem is not None) is refused
    if refused:
        assert "te: trailers" in problem
