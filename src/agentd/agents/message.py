"""The plain message type agents receive and return."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Message"]


@dataclass(slots=True)
class Message:
    """A message to or from an agent: text, opaque bytes and string metadata."""

    text: str = ""
    data: bytes = b""
    metadata: dict[str, str] = field(default_factory=dict)
