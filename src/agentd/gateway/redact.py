"""Server file paths out of error messages that go to clients.

Inner layers write errors for the server's operator: a model that fails to load names its
files (``/srv/agentd/plugins/models/m/model.onnx: not a loadable ONNX model``), and
onnxruntime repeats them. The log keeps that text whole; a client learns what failed, not
where the server keeps its files. A path is redacted to its last component when its first
component is a top-level directory of this machine, which leaves request paths echoed in
errors (``/v2/models/x``, ``/agentd.v1.AgentService/Nope``) as they are.
"""

from __future__ import annotations

import functools
import os
import re

__all__ = ["public_message"]

# An absolute path: "/" not inside a word, a URL or another path, up to a separator that
# error texts put after one (space, quote, colon, comma, bracket...).
_PATH = re.compile(r"(?<![\w./~-])/[^\s'\"`:;,()<>\[\]{}|]+")


def public_message(message: str) -> str:
    """``message`` with every server file path cut to ``…/`` and its last component."""
    if "/" not in message:
        return message
    return _PATH.sub(_redact, message)


def _redact(match: re.Match[str]) -> str:
    path = match.group()
    parts = [part for part in path.split("/") if part]
    if len(parts) < 2 or parts[0] not in _top_level():
        return path
    return "\u2026/" + parts[-1]


@functools.cache
def _top_level() -> frozenset[str]:
    # Read once, on first use (not at import): the machine's root does not change.
    try:
        return frozenset(os.listdir("/"))
    except OSError:
        return frozenset()
