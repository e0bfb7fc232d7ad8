"""The wire format of values crossing processes and machines (docs/cluster.md, Forwarding).

Peers on TCP are a network input, so this is not pickle: decoding builds only the types
below and never runs code; bad bytes raise :class:`CodecError` (an InvalidArgument), never
crash. A value is a one-byte tag and its body, little-endian:

    N T F        None, True, False
    i / I        int: 8-byte signed / length-prefixed two's complement (at most 1 KiB)
    d            float (8 bytes)
    s / b        str (UTF-8) / bytes: 4-byte length, then the bytes
    l / t / m    list / tuple / dict: 4-byte count, then the items (a dict: key, value)
    a            numpy array: dtype, ndim, shape, padding to 8, raw bytes (numeric dtypes)
    M            agentd Message: text, data, metadata
    A            agentd Address: "type/id", checked as ``parse_address`` would
    E            agentd error: its class name, its code, its message

A batch of tells (:func:`encode_tells`) packs its addresses as one newline-joined text and,
when every message is a pair of ints (the swarm's), the messages as one int64 array; other
batches encode each message as above. A batch whose tells were sent from traced turns
carries their trace contexts between the addresses and the messages (the high bit of its
mode byte says so; a batch without any has not one byte more): runs of tells with the same
context, each a 4-byte count and the context in 25 bytes (agentd.observability.trace_wire),
all zeros for tells without one.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from itertools import groupby, repeat
from operator import attrgetter, itemgetter
from typing import Any

import numpy as np

from agentd import errors
from agentd.agents.address import Address
from agentd.agents.message import Message
from agentd.errors import AgentdError, InvalidArgument

__all__ = [
    "CodecError",
    "check",
    "decode",
    "decode_tells",
    "decode_traced_tells",
    "encode",
    "encode_tells",
]

MAX_DEPTH = 64  # nesting of lists, tuples and dicts
MAX_BIG_INT_BYTES = 1024

_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1

# The same rules as agentd.agents.address, for a whole batch's "type/id" lines at once.
_ADDRESS = r"[a-z][a-z0-9_-]{0,63}/[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}"
_ONE_ADDRESS = re.compile(_ADDRESS)
_ADDRESSES = re.compile(rf"(?:{_ADDRESS}\n)*{_ADDRESS}")
_DTYPE = re.compile(r"[<>|]?(?:b1|[iu][1248]|f[248]|c(?:8|16))")

# Every agentd error class, by name: an error keeps its class across nodes.
_ERRORS: dict[str, type[AgentdError]] = {
    name: cls
    for name in errors.__all__
    if isinstance(cls := getattr(errors, name), type) and issubclass(cls, AgentdError)
}
# An unknown class arrives as the plain class of its code (Unavailable, not StartupError).
_BY_CODE: dict[int, type[AgentdError]] = {
    cls.code.value: cls for cls in _ERRORS.values() if cls.__bases__ == (AgentdError,)
}


class CodecError(InvalidArgument):
    """A value cannot be sent to another node, or bytes from one are not a valid value."""


# -- checking (at send time: a tell is encoded later, with its batch) --------------------

_SCALARS = frozenset({type(None), bool, int, float, str, bytes})


def check(value: Any, depth: int = 0) -> None:
    """Raise CodecError if ``value`` cannot be sent to another node; cheap for the common
    cases (scalars, a pair of ints)."""
    kind = type(value)
    if kind in _SCALARS:
        if kind is int and not _INT_MIN <= value <= _INT_MAX:
            _big_int_bytes(value)
        return
    if depth >= MAX_DEPTH:
        raise CodecError(f"cannot send a value nested deeper than {MAX_DEPTH} levels")
    if kind is tuple or kind is list:
        for item in value:
            check(item, depth + 1)
    elif kind is dict:
        for key, item in value.items():
            check(key, depth + 1)
            check(item, depth + 1)
    elif kind is np.ndarray:
        _array_dtype(value)
    elif kind is Message:
        if (
            type(value.text) is not str
            or type(value.data) is not bytes
            or type(value.metadata) is not dict
            or not all(type(k) is str and type(v) is str for k, v in value.metadata.items())
        ):
            raise CodecError(
                "cannot send a Message whose fields are not str, bytes and dict[str, str]"
            )
    elif kind is Address or isinstance(value, AgentdError):
        return
    else:
        raise CodecError(
            f"cannot send {kind.__module__}.{kind.__qualname__} to an agent on another node "
            "(send None, bool, int, float, str, bytes, list, tuple, dict, numeric numpy "
            "arrays, Message or Address)"
        )


def _big_int_bytes(value: int) -> bytes:
    size = (value.bit_length() + 8) // 8
    if size > MAX_BIG_INT_BYTES:
        raise CodecError(f"cannot send an int of more than {MAX_BIG_INT_BYTES * 8} bits")
    return value.to_bytes(size, "little", signed=True)


def _array_dtype(array: np.ndarray) -> str:
    dtype = array.dtype
    text = dtype.str
    if not _DTYPE.fullmatch(text):
        raise CodecError(
            f"cannot send a numpy array of dtype {dtype} to another node (numeric dtypes only)"
        )
    return text


# -- encoding ----------------------------------------------------------------------------


def encode(value: Any) -> bytes:
    """``value`` as bytes; CodecError for what cannot be sent."""
    out = bytearray()
    _encode(value, out, 0)
    return bytes(out)


def _encode(value: Any, out: bytearray, depth: int) -> None:
    kind = type(value)
    if kind is int:
        if _INT_MIN <= value <= _INT_MAX:
            out += b"i"
            out += _I64.pack(value)
        else:
            raw = _big_int_bytes(value)
            out += b"I"
            out += _U32.pack(len(raw))
            out += raw
    elif kind is str:
        raw = value.encode("utf-8", "surrogatepass")
        out += b"s"
        out += _U32.pack(len(raw))
        out += raw
    elif value is None:
        out += b"N"
    elif kind is bool:
        out += b"T" if value else b"F"
    elif kind is float:
        out += b"d"
        out += _F64.pack(value)
    elif kind is bytes:
        out += b"b"
        out += _U32.pack(len(value))
        out += value
    elif kind is tuple or kind is list or kind is dict:
        if depth >= MAX_DEPTH:
            raise CodecError(f"cannot send a value nested deeper than {MAX_DEPTH} levels")
        out += b"t" if kind is tuple else b"l" if kind is list else b"m"
        out += _U32.pack(len(value))
        if kind is dict:
            for key, item in value.items():
                _encode(key, out, depth + 1)
                _encode(item, out, depth + 1)
        else:
            for item in value:
                _encode(item, out, depth + 1)
    elif kind is np.ndarray:
        _encode_array(value, out)
    elif kind is Message:
        check(value)
        out += b"M"
        _encode(value.text, out, depth)
        _encode(value.data, out, depth)
        out += _U32.pack(len(value.metadata))
        for key, item in value.metadata.items():
            _encode(key, out, depth)
            _encode(item, out, depth)
    elif kind is Address:
        raw = (value.type + "/" + value.id).encode()
        out += b"A"
        out += _U32.pack(len(raw))
        out += raw
    elif isinstance(value, AgentdError):
        out += b"E"
        _encode(type(value).__name__, out, depth)
        out += _U32.pack(value.code.value)
        _encode(str(value.message), out, depth)
    else:
        check(value)  # raises the clear error
        raise CodecError(f"cannot send {kind.__name__}")  # pragma: no cover


def _encode_array(array: np.ndarray, out: bytearray) -> None:
    dtype = _array_dtype(array).encode()
    out += b"a"
    out.append(len(dtype))
    out += dtype
    out.append(array.ndim)
    for dim in array.shape:
        out += _U64.pack(dim)
    # Raw bytes start 8-aligned (in the frame): decoded arrays are aligned views.
    out += b"\0" * (-(len(out) + 8) % 8)
    raw = np.ascontiguousarray(array).data
    out += _U64.pack(raw.nbytes)
    out += raw


# -- decoding ----------------------------------------------------------------------------


def decode(data: bytes | memoryview) -> Any:
    """The value ``data`` encodes; CodecError for anything else (trailing bytes too).

    Arrays are read-only views of ``data`` (no copy)."""
    view = data if isinstance(data, memoryview) else memoryview(data)
    value, end = _decode_at(view, 0)
    if end != len(view):
        raise CodecError(f"{len(view) - end} bytes after the value")
    return value


def _decode_at(view: memoryview, pos: int) -> tuple[Any, int]:
    try:
        return _decode(view, pos, 0)
    except CodecError:
        raise
    except (struct.error, IndexError, ValueError, TypeError, UnicodeDecodeError) as exc:
        # Truncated or inconsistent input; every path that reads past the end lands here.
        raise CodecError(f"malformed value: {type(exc).__name__}: {exc}") from None


def _decode(view: memoryview, pos: int, depth: int) -> tuple[Any, int]:
    tag = view[pos]
    pos += 1
    if tag == 0x69:  # i
        return _I64.unpack_from(view, pos)[0], pos + 8
    if tag == 0x73:  # s
        size = _U32.unpack_from(view, pos)[0]
        pos += 4
        end = _need(view, pos, size)
        return str(view[pos:end], "utf-8", "surrogatepass"), end
    if tag == 0x74 or tag == 0x6C:  # t, l
        if depth >= MAX_DEPTH:
            raise CodecError(f"nested deeper than {MAX_DEPTH} levels")
        count = _U32.unpack_from(view, pos)[0]
        pos += 4
        _need(view, pos, count)  # at least one byte an item: no huge loop on a short input
        items: list[Any] = []
        append = items.append
        for _ in range(count):
            item, pos = _decode(view, pos, depth + 1)
            append(item)
        return (tuple(items) if tag == 0x74 else items), pos
    if tag == 0x4E:  # N
        return None, pos
    if tag == 0x54:  # T
        return True, pos
    if tag == 0x46:  # F
        return False, pos
    if tag == 0x64:  # d
        return _F64.unpack_from(view, pos)[0], pos + 8
    if tag == 0x62:  # b
        size = _U32.unpack_from(view, pos)[0]
        pos += 4
        end = _need(view, pos, size)
        return bytes(view[pos:end]), end
    if tag == 0x6D:  # m
        if depth >= MAX_DEPTH:
            raise CodecError(f"nested deeper than {MAX_DEPTH} levels")
        count = _U32.unpack_from(view, pos)[0]
        pos += 4
        _need(view, pos, 2 * count)
        result: dict[Any, Any] = {}
        for _ in range(count):
            key, pos = _decode(view, pos, depth + 1)
            item, pos = _decode(view, pos, depth + 1)
            result[key] = item  # an unhashable key: TypeError, reported as malformed
        return result, pos
    if tag == 0x61:  # a
        return _decode_array(view, pos)
    if tag == 0x4D:  # M
        text, pos = _decode(view, pos, MAX_DEPTH)
        data, pos = _decode(view, pos, MAX_DEPTH)
        count = _U32.unpack_from(view, pos)[0]
        pos += 4
        _need(view, pos, 2 * count)
        metadata = {}
        for _ in range(count):
            key, pos = _decode(view, pos, MAX_DEPTH)
            item, pos = _decode(view, pos, MAX_DEPTH)
            metadata[key] = item
        message = Message(text, data, metadata)
        check(message)
        return message, pos
    if tag == 0x41:  # A
        size = _U32.unpack_from(view, pos)[0]
        pos += 4
        end = _need(view, pos, size)
        return _address(str(view[pos:end], "utf-8")), end
    if tag == 0x45:  # E
        return _decode_error(view, pos)
    if tag == 0x49:  # I
        size = _U32.unpack_from(view, pos)[0]
        pos += 4
        if size > MAX_BIG_INT_BYTES:
            raise CodecError(f"an int of more than {MAX_BIG_INT_BYTES * 8} bits")
        end = _need(view, pos, size)
        return int.from_bytes(view[pos:end], "little", signed=True), end
    raise CodecError(f"unknown tag byte 0x{tag:02x} at offset {pos - 1}")


def _need(view: memoryview, pos: int, size: int) -> int:
    end = pos + size
    if end > len(view):
        raise CodecError(f"truncated: {size} bytes needed at offset {pos}")
    return end


def _address(text: str) -> Address:
    if not _ONE_ADDRESS.fullmatch(text):
        raise CodecError(f"malformed agent address {text[:100]!r}")
    type_name, _, instance_id = text.partition("/")
    return Address(type_name, instance_id)


def _decode_array(view: memoryview, pos: int) -> tuple[np.ndarray, int]:
    size = view[pos]
    end = _need(view, pos + 1, size)
    text = str(view[pos + 1 : end], "ascii")
    if not _DTYPE.fullmatch(text):
        raise CodecError(f"numpy dtype {text[:20]!r} is not a numeric dtype")
    dtype = np.dtype(text)
    ndim = view[end]
    pos = end + 1
    if ndim > 32:
        raise CodecError(f"an array of {ndim} dimensions")
    shape = struct.unpack_from(f"<{ndim}Q", view, pos)
    pos += 8 * ndim
    pos += -(pos + 8) % 8
    nbytes = _U64.unpack_from(view, pos)[0]
    pos += 8
    count = 1
    for dim in shape:
        count *= dim
    if count * dtype.itemsize != nbytes:
        raise CodecError(f"array of shape {shape} and dtype {dtype} in {nbytes} bytes")
    end = _need(view, pos, nbytes)
    array = np.frombuffer(view[pos:end], dtype=dtype, count=count).reshape(shape)
    return array, end


def _decode_error(view: memoryview, pos: int) -> tuple[AgentdError, int]:
    name, pos = _decode(view, pos, MAX_DEPTH)
    code = _U32.unpack_from(view, pos)[0]
    message, pos = _decode(view, pos + 4, MAX_DEPTH)
    if type(name) is not str or type(message) is not str:
        raise CodecError("malformed error")
    cls = _ERRORS.get(name) or _BY_CODE.get(code, errors.Internal)
    return cls(message), pos


# -- batches of tells --------------------------------------------------------------------

_PAIRS = 0  # every message is a pair of int64
_VALUES = 1  # each message encoded as a value
_INT_ARRAYS = 2  # every message is (int64, array), the arrays of one dtype and shape
_FIRST, _SECOND = itemgetter(0), itemgetter(1)
_DTYPE_SHAPE = attrgetter("dtype", "shape")
_TRACED = 0x80  # a mode bit: the batch carries trace contexts
_TELLS_HEAD = struct.Struct("<IIB")
CONTEXT_SIZE = 25  # a trace context: trace id, span id, flags
_NO_CONTEXT = bytes(CONTEXT_SIZE)
_RUN = struct.Struct("<I")


def encode_tells(
    addresses: Sequence[Address],
    messages: Sequence[Any],
    contexts: Sequence[bytes | None] | None = None,
) -> bytes:
    """One frame body for a batch of tells (``addresses[i]`` gets ``messages[i]``, sent
    under the trace context ``contexts[i]``: 25 bytes or None); the messages were checked
    when told."""
    count = len(addresses)
    text = "\n".join(map("/".join, addresses)).encode()
    mode, packed = _pack_messages(messages) if count else (_VALUES, None)
    runs = _runs(contexts) if contexts is not None and count else None
    out = bytearray(_TELLS_HEAD.pack(count, len(text), mode | _TRACED if runs else mode))
    out += text
    if runs:
        out += _RUN.pack(len(runs))
        for context, size in runs:
            out += _RUN.pack(size)
            out += context
    if mode == _PAIRS:
        out += b"\0" * (-len(out) % 8)
        out += packed.data  # type: ignore[union-attr]
    elif mode == _INT_ARRAYS:
        ints, arrays = packed  # type: ignore[misc]
        _encode_array(arrays, out)
        out += b"\0" * (-len(out) % 8)
        out += ints.data
    else:
        for message in messages:
            _encode(message, out, 0)
    return bytes(out)


def _runs(contexts: Sequence[bytes | None]) -> list[tuple[bytes, int]] | None:
    """``contexts`` as (context, how many in a row), or None when none is set."""
    runs: list[tuple[bytes, int]] = []
    traced = False
    for context, group in groupby(contexts):
        if context is None:
            context = _NO_CONTEXT
        elif len(context) != CONTEXT_SIZE or context == _NO_CONTEXT:
            raise CodecError("a malformed trace context in a batch of tells")
        else:
            traced = True
        runs.append((context, sum(1 for _ in group)))
    return runs if traced else None


def _pack_messages(messages: Sequence[Any]) -> tuple[int, Any]:
    """The batch's messages as arrays when they all have one of the swarm's shapes, with
    checks that loop in C: every message a tuple of two, the first an exact int (not a
    bool), the second an int too (pairs) or arrays of one numeric dtype and shape."""
    if set(map(type, messages)) != {tuple} or set(map(len, messages)) != {2}:
        return _VALUES, None
    if set(map(type, map(_FIRST, messages))) != {int}:
        return _VALUES, None
    seconds = set(map(type, map(_SECOND, messages)))
    try:
        if seconds == {int}:
            return _PAIRS, np.array(messages, dtype="<i8")
        if seconds == {np.ndarray}:
            arrays = list(map(_SECOND, messages))
            if len(set(map(_DTYPE_SHAPE, arrays))) == 1 and _DTYPE.fullmatch(arrays[0].dtype.str):
                ints = np.array(list(map(_FIRST, messages)), dtype="<i8")
                return _INT_ARRAYS, (ints, np.stack(arrays))
    except OverflowError:  # a big int: the general form
        pass
    return _VALUES, None


def decode_tells(data: bytes | memoryview) -> tuple[list[Address], list[Any]]:
    """The addresses and messages of a batch of tells; CodecError for bad bytes."""
    addresses, messages, _ = decode_traced_tells(data)
    return addresses, messages


def decode_traced_tells(
    data: bytes | memoryview,
) -> tuple[list[Address], list[Any], list[bytes | None] | None]:
    """The addresses, messages and trace contexts (25 bytes or None per tell; None for a
    batch without any) of a batch of tells; CodecError for bad bytes."""
    view = data if isinstance(data, memoryview) else memoryview(data)
    try:
        count, size, mode = _TELLS_HEAD.unpack_from(view, 0)
        pos = _TELLS_HEAD.size
        end = _need(view, pos, size)
        text = str(view[pos:end], "utf-8")
    except (struct.error, UnicodeDecodeError) as exc:
        raise CodecError(f"malformed batch of tells: {exc}") from None
    if count == 0:
        if size or mode != _VALUES or end != len(view):
            raise CodecError("malformed empty batch of tells")
        return [], [], None
    if not _ADDRESSES.fullmatch(text):
        raise CodecError("malformed agent address in a batch of tells")
    lines = text.count("\n") + 1
    if lines != count:
        raise CodecError(f"a batch of {count} tells with {lines} addresses")
    # "type/id" lines checked above: split once, build the tuples in C.
    flat = text.replace("\n", "/").split("/")
    addresses = list(map(tuple.__new__, repeat(Address), zip(flat[0::2], flat[1::2], strict=True)))
    pos = end
    contexts = None
    if mode & _TRACED:
        mode &= ~_TRACED
        contexts, pos = _decode_contexts(view, pos, count)
    if mode == _PAIRS:
        pos += -pos % 8
        end = _need(view, pos, 16 * count)
        if end != len(view):
            raise CodecError(f"{len(view) - end} bytes after a batch of tells")
        pairs = np.frombuffer(view[pos:end], dtype="<i8").reshape(count, 2)
        messages: list[Any] = list(zip(pairs[:, 0].tolist(), pairs[:, 1].tolist(), strict=True))
        return addresses, messages, contexts
    if mode == _INT_ARRAYS:
        try:
            stacked, pos = _decode(view, pos, 0) if view[pos] == 0x61 else (None, pos)
        except (struct.error, IndexError, ValueError) as exc:
            raise CodecError(f"malformed batch of tells: {exc}") from None
        if stacked is None or stacked.ndim < 1 or len(stacked) != count:
            raise CodecError("malformed arrays in a batch of tells")
        pos += -pos % 8
        end = _need(view, pos, 8 * count)
        if end != len(view):
            raise CodecError(f"{len(view) - end} bytes after a batch of tells")
        ints = np.frombuffer(view[pos:end], dtype="<i8").tolist()
        return addresses, list(zip(ints, stacked, strict=True)), contexts
    if mode != _VALUES:
        raise CodecError(f"unknown batch mode {mode}")
    messages = []
    append = messages.append
    for _ in range(count):
        message, pos = _decode_at(view, pos)
        append(message)
    if pos != len(view):
        raise CodecError(f"{len(view) - pos} bytes after a batch of tells")
    return addresses, messages, contexts


def _decode_contexts(view: memoryview, pos: int, count: int) -> tuple[list[bytes | None], int]:
    """The runs of trace contexts of a batch of ``count`` tells, one per tell."""
    try:
        runs = _RUN.unpack_from(view, pos)[0]
        pos += 4
        if not 1 <= runs <= count:
            raise CodecError(f"{runs} runs of trace contexts for {count} tells")
        end = _need(view, pos, runs * (4 + CONTEXT_SIZE))
        contexts: list[bytes | None] = []
        for start in range(pos, end, 4 + CONTEXT_SIZE):
            size = _RUN.unpack_from(view, start)[0]
            raw = bytes(view[start + 4 : start + 4 + CONTEXT_SIZE])
            context = None if raw == _NO_CONTEXT else raw
            if context is not None and (not any(raw[:16]) or not any(raw[16:24])):
                raise CodecError("a trace context with a zero trace id or span id")
            if size == 0 or len(contexts) + size > count:
                raise CodecError(f"a run of {size} trace contexts in a batch of {count} tells")
            contexts += [context] * size
    except struct.error as exc:
        raise CodecError(f"malformed trace contexts in a batch of tells: {exc}") from None
    if len(contexts) != count:
        raise CodecError(f"{len(contexts)} trace contexts for {count} tells")
    return contexts, end
