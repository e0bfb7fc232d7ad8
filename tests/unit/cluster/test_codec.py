"""The wire format between nodes: what agents send survives the trip with its type, what
cannot be sent is refused clearly, and hostile bytes are a CodecError, never a crash."""

from __future__ import annotations

import contextlib
import random
import struct
import time

import numpy as np
import pytest

from agentd.agents.address import Address
from agentd.agents.message import Message
from agentd.cluster import codec
from agentd.cluster.codec import (
    CodecError,
    check,
    decode,
    decode_tells,
    decode_traced_tells,
    encode,
    encode_tells,
)
from agentd.errors import DeadlineExceeded, InvalidArgument, NotFound, Unavailable

VALUES = [
    None,
    True,
    False,
    0,
    -1,
    2**63 - 1,
    -(2**63),
    2**100,
    -(2**200),
    1.5,
    float("inf"),
    "",
    "héllo \u2603",
    b"",
    b"\x00\xff",
    [],
    (),
    [1, (2, [3])],
    (1,),
    {"a": 1, "b": {"c": (1, 2)}},
    {1: "int key", (1, 2): "tuple key"},
    Message(),
    Message("t", b"d", {"k": "v"}),
    Address("echo", "x-1"),
    (7, Address("decider", "3")),
]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_values_round_trip_with_their_types(value):
    decoded = decode(encode(value))
    assert decoded == value
    assert type(decoded) is type(value)
    if isinstance(value, list | tuple):
        assert [type(x) for x in decoded] == [type(x) for x in value]


@pytest.mark.parametrize(
    "array",
    [
        np.arange(16, dtype=np.float32).reshape(1, 16),
        np.zeros((0, 3), dtype=np.int64),
        np.array(3.5),
        np.arange(6, dtype=">i4").reshape(2, 3),
        np.array([True, False]),
        np.array([1 + 2j], dtype=np.complex64),
        np.arange(12, dtype=np.uint8).reshape(3, 4)[:, ::2],  # not contiguous
    ],
    ids=lambda a: f"{a.dtype}{a.shape}",
)
def test_numpy_arrays_round_trip_as_views(array):
    decoded = decode(encode(array))
    assert decoded.dtype == array.dtype
    assert decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)
    if array.size:
        assert not decoded.flags.owndata  # a view of the received bytes, no copy


def test_errors_keep_their_class_and_message():
    for error in (NotFound("no agent x"), DeadlineExceeded("late"), Unavailable("gone")):
        decoded = decode(encode(error))
        assert type(decoded) is type(error)
        assert decoded.message == error.message
    # An error class the receiver does not know arrives as the class of its code.

    class Moved(Unavailable):
        pass

    assert type(decode(encode(Moved("moved")))) is Unavailable


@pytest.mark.parametrize(
    "value", [object(), {1, 2}, np.array(["a"]), np.array([object()]), [1, lambda: 0]]
)
def test_what_cannot_cross_nodes_is_refused_clearly(value):
    with pytest.raises(InvalidArgument, match="cannot send"):
        check(value)
    with pytest.raises(InvalidArgument, match="cannot send"):
        encode(value)


def test_limits_are_refused_at_send_time():
    with pytest.raises(CodecError, match="int of more than"):
        check(2**10_000)
    deep: list = []
    for _ in range(codec.MAX_DEPTH + 1):
        deep = [deep]
    with pytest.raises(CodecError, match="nested deeper"):
        encode(deep)
    with pytest.raises(CodecError, match="Message"):
        check(Message(text=1))  # type: ignore[arg-type]


HOSTILE = [
    b"",
    b"Z",
    b"i\x00",
    b"s\xff\xff\xff\xff",  # a 4 GiB string in 5 bytes
    b"l\xff\xff\xff\x7f",  # 2 billion items promised
    b"m\x01\x00\x00\x00l\x00\x00\x00\x00i" + b"\x00" * 8,  # an unhashable key
    b"s\x02\x00\x00\x00\xff\xfe",  # not UTF-8
    b"A\x05\x00\x00\x00../..",  # a bad address
    b"a\x03|O8\x00" + b"\x00" * 16,  # an object array
    b"a\x03<f4\x01" + struct.pack("<Q", 2**62) + b"\x00" * 8 + struct.pack("<Q", 16),
    b"a\x0c(1000,)<f8\x00",  # a sub-array dtype
    b"I\xff\xff\x00\x00" + b"\x01" * 10,
    b"l\x01\x00\x00\x00" * 200 + b"N",  # nested past the limit
    b"NN",  # trailing bytes
    b"E" + encode(3) + b"\x05\x00\x00\x00" + encode("x"),  # an error whose name is no str
    b"M" + encode("t") + encode(b"") + b"\x01\x00\x00\x00" + encode("k") + encode(1),
]


@pytest.mark.parametrize("data", HOSTILE, ids=lambda d: d[:12].hex())
def test_hostile_bytes_are_a_codec_error(data):
    with pytest.raises(CodecError):
        decode(data)


def test_random_and_mutated_bytes_never_escape_as_anything_but_codec_errors():
    rng = random.Random(14)
    seeds = [encode(v) for v in VALUES] + [encode(np.ones((2, 2), np.float32))]
    seeds.append(encode_tells([Address("a", "1")], [(1, 2)]))
    seeds.append(encode_tells([Address("a", "1"), Address("a", "2")], ["x", 2], [CTX, None]))
    for _ in range(5000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            if data and rng.random() < 0.7:
                data[rng.randrange(len(data))] = rng.randrange(256)
            else:
                data = data[: rng.randrange(len(data) + 1)]
        for decoder in (decode, decode_tells, decode_traced_tells):
            with contextlib.suppress(CodecError):
                decoder(bytes(data))


def test_batches_of_tells_round_trip_in_every_form():
    addresses = [Address("counter", str(i)) for i in range(100)]
    forms = [
        [(i, i + 1) for i in range(100)],  # the swarm's tells
        [(i, np.full((1, 16), i, np.float32)) for i in range(100)],  # its start messages
        [(i, 2**70) for i in range(100)],  # big ints: the general form
        [(True, 1)] * 100,  # bools stay bools
        [f"m{i}" for i in range(100)],
        [(i, np.zeros(i % 3)) for i in range(100)],  # arrays of differing shapes
    ]
    for messages in forms:
        got_addresses, got = decode_tells(encode_tells(addresses, messages))
        assert got_addresses == addresses
        assert all(type(a) is Address for a in got_addresses)
        for mine, theirs in zip(messages, got, strict=True):
            assert type(theirs) is type(mine)
            assert [type(x) for x in theirs] == [type(x) for x in mine]
            if isinstance(mine, tuple) and isinstance(mine[1], np.ndarray):
                np.testing.assert_array_equal(theirs[1], mine[1])
            else:
                assert theirs == mine
    assert decode_tells(encode_tells([], [])) == ([], [])


def test_hostile_batches_of_tells_are_codec_errors():
    good = encode_tells([Address("a", "1"), Address("a", "2")], [(1, 2), (3, 4)])
    head = struct.Struct("<IIB")
    count, size, mode = head.unpack_from(good)
    cases = [
        good[:-1],
        head.pack(count + 1, size, mode) + good[head.size :],
        head.pack(count, size, 9) + good[head.size :],
        head.pack(count, size + 100, mode) + good[head.size :],
        good.replace(b"a/1", b"A/1"),  # a type must be lower case
        good.replace(b"a/1\n", b"a/1/\n"),
    ]
    for data in cases:
        with pytest.raises(CodecError):
            decode_tells(data)


CTX = bytes(range(1, 26))  # trace id 0x0102..10, span id 0x11..18, flags 0x19
OTHER = bytes(range(2, 27))


def test_trace_contexts_travel_with_their_tells_in_every_form():
    addresses = [Address("counter", str(i)) for i in range(100)]
    # Runs of one context (a turn's tells), gaps without one, a context that comes back.
    contexts = [CTX] * 40 + [None] * 10 + [OTHER] * 30 + [CTX] * 19 + [None]
    forms = [
        [(i, i + 1) for i in range(100)],
        [(i, np.full((1, 16), i, np.float32)) for i in range(100)],
        [f"m{i}" for i in range(100)],
    ]
    for messages in forms:
        got_addresses, got, got_contexts = decode_traced_tells(
            encode_tells(addresses, messages, contexts)
        )
        assert got_addresses == addresses
        assert got_contexts == contexts
        assert [type(m) for m in got] == [type(m) for m in messages]
        # A reader that wants no contexts gets the same tells.
        assert decode_tells(encode_tells(addresses, messages, contexts))[0] == addresses
        # No context set: not one byte more on the wire than without tracing.
        untraced = encode_tells(addresses, messages)
        assert encode_tells(addresses, messages, [None] * 100) == untraced
        assert decode_traced_tells(untraced)[2] is None
    # One context for a whole batch: 33 bytes (give or take the pairs' 8-byte alignment).
    pairs = [(i, i) for i in range(100)]
    added = len(encode_tells(addresses, pairs, [CTX] * 100)) - len(encode_tells(addresses, pairs))
    assert abs(added - 33) < 8
    assert decode_traced_tells(encode_tells([], [], [])) == ([], [], None)


def test_malformed_trace_contexts_are_refused_when_sent():
    addresses = [Address("a", "1")]
    for bad in (b"short", bytes(25)):
        with pytest.raises(CodecError):
            encode_tells(addresses, [1], [bad])


def test_hostile_trace_contexts_in_a_batch_are_codec_errors():
    addresses = [Address("a", "1"), Address("a", "2")]
    good = encode_tells(addresses, [(1, 2), (3, 4)], [CTX, OTHER])
    head = struct.Struct("<IIB")
    count, size, _ = head.unpack_from(good)
    at = head.size + size  # where the runs start
    run = struct.Struct("<I")

    def runs(*items: tuple[int, bytes]) -> bytes:
        body = run.pack(len(items)) + b"".join(run.pack(n) + c for n, c in items)
        return good[:at] + body + good[at + 4 + 2 * 29 :]

    cases = [
        good[: at + 2],  # truncated in the runs' count
        good[: at + 20],  # truncated in a run
        good[:at] + run.pack(0) + good[at + 4 :],  # no runs
        good[:at] + run.pack(3) + good[at + 4 :],  # more runs than tells
        runs((1, CTX), (2, OTHER)),  # three contexts for two tells
        runs((0, CTX), (2, OTHER)),  # an empty run
        runs((1, CTX), (0, OTHER)),
        runs((2**32 - 1, CTX), (1, OTHER)),  # a huge run
        runs((1, bytes(16) + CTX[16:]), (1, OTHER)),  # a zero trace id
        runs((1, CTX[:16] + bytes(8) + b"\x01"), (1, OTHER)),  # a zero span id
        head.pack(count, size, 0x80 | 9) + good[head.size :],  # traced, unknown mode
        head.pack(0, 0, 0x80 | 1),  # an empty batch cannot be traced
    ]
    for data in cases:
        with pytest.raises(CodecError):
            decode_traced_tells(data)
        with pytest.raises(CodecError):
            decode_tells(data)


def test_a_batch_of_4096_tells_encodes_and_decodes_in_a_few_milliseconds():
    addresses = [Address("decider", str(i)) for i in range(4096)]
    messages = [(i, i % 7) for i in range(4096)]
    best = float("inf")
    for _ in range(10):
        started = time.perf_counter()
        decode_tells(encode_tells(addresses, messages))
        best = min(best, time.perf_counter() - started)
    # About 2 ms on this machine (docs/cluster.md); generous under a shared CPU.
    assert best < 0.05
