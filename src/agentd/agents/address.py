"""Agent addresses: ``type/id``."""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

from agentd.errors import InvalidArgument

__all__ = ["DEFAULT_ID", "Address", "parse_address"]

DEFAULT_ID = "default"
_TYPE = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")


class Address(NamedTuple):
    """Where an agent instance lives: its type and its id within the type."""

    type: str
    id: str

    def __str__(self) -> str:
        return f"{self.type}/{self.id}"


@functools.lru_cache(maxsize=65536)
def parse_address(text: str) -> Address:
    """Parse ``type/id`` (or a bare ``type``, meaning ``type/default``).

    Raises InvalidArgument naming what is wrong. Recent results are cached: agents send to
    the same few addresses over and over.
    """
    type_name, sep, instance_id = text.partition("/")
    if not sep:
        instance_id = DEFAULT_ID
    if not _TYPE.fullmatch(type_name):
        raise InvalidArgument(
            f"malformed agent address {_clip(text)!r}: the type must match {_TYPE.pattern}"
        )
    if not _ID.fullmatch(instance_id):
        raise InvalidArgument(
            f"malformed agent address {_clip(text)!r}: the id must match {_ID.pattern}"
        )
    return Address(type_name, instance_id)


def _clip(text: str, limit: int = 100) -> str:
    # Error messages echo the address; a megabyte of it must not come back as the error.
    return text if len(text) <= limit else text[:limit] + "\u2026"
