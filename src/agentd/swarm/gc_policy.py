"""Garbage-collector settings for processes that hold millions of long-lived objects.

CPython's cyclic collector rescans long-lived objects on every full collection, and a
young-generation threshold of 700 triggers collections every few hundred turns. With a
million agents alive that costs more than the agents' own work (measured in
docs/runtime.md), so the swarm raises the young threshold and lets the actor host
``gc.freeze()`` activations as they accumulate. Reference counting still frees all
acyclic garbage at once.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["many_objects_gc"]


@contextlib.contextmanager
def many_objects_gc(young_threshold: int = 100_000) -> Iterator[None]:
    previous = gc.get_threshold()
    gc.set_threshold(young_threshold, 20, 100)
    try:
        yield
    finally:
        gc.set_threshold(*previous)
        gc.unfreeze()
        gc.collect()
