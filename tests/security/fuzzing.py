"""Seeded generators of hostile input for the decoder fuzzers: JSON values of every wrong
type, documents mutated at a random place, bytes cut and flipped, tensor shapes at the
edges. Everything draws from a ``random.Random`` the caller seeds, so a failing case is
found again by its seed and index.
"""

from __future__ import annotations

import copy
import json
import random
from typing import Any

__all__ = [
    "EDGE_DIMS",
    "EDGE_INTS",
    "edge_shape",
    "junk",
    "mutate_bytes",
    "mutate_doc",
    "serialize",
]

EDGE_INTS = [
    0,
    1,
    -1,
    7,
    255,
    256,
    65535,
    2**31 - 1,
    2**31,
    2**32,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64,
    -(2**63),
    -(2**63) - 1,
    10**30,
]
EDGE_FLOATS = [0.0, -0.0, 0.5, -1.5, 65504.0, 65520.0, 3.5e38, 1e308, -1e308, 5e-324]
STRINGS = [
    "",
    "a",
    "echo",
    "tinylm",
    "decision",
    "INPUT0",
    "FP32",
    "BYTES",
    "\u00e9\u00e8",
    "\u202e\u0000",
    "../../etc/passwd",
    "a/b/c",
    "%00%ff",
    "null",
    "true",
    "1e999",
    "\U0001f600" * 3,
]
EDGE_DIMS = [0, 0, 1, 1, 2, 4, 8, 9, 16, 2**31 - 1, 2**31, 2**32, 2**62, -1, -(2**31)]


def junk(rng: random.Random, depth: int = 0) -> Any:
    """A JSON value of any type: edge numbers, odd strings, nesting."""
    kind = rng.randrange(11 if depth < 3 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice(EDGE_INTS)
    if kind == 3:
        return rng.choice(EDGE_FLOATS)
    if kind == 4:
        return rng.choice(STRINGS)
    if kind == 5:
        return "x" * rng.choice([100, 3000])
    if kind == 6:
        return rng.randint(-1000, 1000)
    if kind == 7:
        return [junk(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 8:
        return {rng.choice(STRINGS): junk(rng, depth + 1) for _ in range(rng.randrange(4))}
    if kind == 9:
        nested: Any = rng.choice([1, "x", None])
        for _ in range(rng.choice([10, 60, 150])):  # deeper comes as bytes (mutate_bytes)
            nested = [nested]
        return nested
    return [rng.choice(EDGE_FLOATS) for _ in range(rng.randrange(40))]


def _places(doc: Any, found: list[tuple[Any, Any]]) -> None:
    if isinstance(doc, dict):
        for key, value in doc.items():
            found.append((doc, key))
            _places(value, found)
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            found.append((doc, index))
            _places(value, found)


def mutate_doc(rng: random.Random, doc: Any, *, rounds: int = 2) -> Any:
    """A copy of ``doc`` with one or a few changes at random places: a value replaced by
    one of another type, a key dropped or added, a list emptied or grown."""
    doc = copy.deepcopy(doc)
    for _ in range(rng.randint(1, rounds)):
        places: list[tuple[Any, Any]] = []
        _places(doc, places)
        if not places or rng.random() < 0.03:
            return junk(rng)
        container, key = rng.choice(places)
        action = rng.randrange(6)
        if action <= 2:
            container[key] = junk(rng)
        elif action == 3 and isinstance(container, dict):
            del container[key]
        elif action == 3:
            container.pop(key)
        elif action == 4 and isinstance(container, dict):
            container[rng.choice(STRINGS) or "extra"] = junk(rng)
        elif action == 4:
            container.append(copy.deepcopy(container[key]))
        else:
            value = container[key]
            container[key] = [value] if rng.random() < 0.5 else {"value": value}
    return doc


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    """``data`` cut short, with bytes flipped, inserted or repeated."""
    data = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        action = rng.randrange(5)
        at = rng.randrange(len(data) + 1)
        if action == 0:
            del data[at:]
        elif action == 1 and data:
            data[min(at, len(data) - 1)] = rng.randrange(256)
        elif action == 2:
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
        elif action == 3:
            data[at:at] = rng.choice(
                [b"NaN", b"Infinity", b"-", b'"', b"\\u", b"\xff\xfe", b"{", b"[" * 3000]
            )
        else:
            data += data[: rng.randrange(len(data) + 1)]
    return bytes(data)


def serialize(rng: random.Random, doc: Any, *, broken: float = 0.15) -> bytes:
    """``doc`` as JSON; a ``broken`` share of them mangled at the byte level."""
    try:
        raw = json.dumps(doc).encode()
    except (ValueError, RecursionError):
        raw = b"[" * 5000
    return mutate_bytes(rng, raw) if rng.random() < broken else raw


def edge_shape(rng: random.Random, fit: list[int]) -> list[int]:
    """Mostly ``fit`` (the shape the data has), else a shape at the edges of the limits."""
    if rng.random() < 0.5:
        return list(fit)
    return [rng.choice(EDGE_DIMS) for _ in range(rng.choice([0, 1, 2, 2, 3, 5, 33]))]
