"""The one deadline rule of a node: every turn, inference, generation and tool call has a
deadline, the caller's if it gave one, else the configured default, never past the
configured maximum.

The services resolve it (the runtime for turns, the inference service for model calls,
the generation service for completions); the gateway's protocol adapters only convert
their protocol's header or field to seconds (``grpc-timeout``, ``connect-timeout-ms``,
KServe's ``parameters.timeout``) and pass it on, or None when the caller sent none. Tool
calls follow the same rule with the tool service's own ``tool_timeout_s`` as both their
default and their cap.
"""

from __future__ import annotations

import asyncio

from agentd.errors import DeadlineExceeded, InvalidArgument

__all__ = ["DeadlinePolicy"]


class DeadlinePolicy:
    """``default_s``: a call's time when its caller gives none (None: no limit).
    ``max_s``: the most a caller may ask for (None: no cap). The default of a policy with
    neither leaves calls unbounded, as they were before a node configured one.

    One object per node, shared by the services that apply it: :meth:`update` changes it
    in place (a settings reload), and the next call anywhere gets the new rule."""

    __slots__ = ("default_s", "max_s")

    def __init__(self, default_s: float | None = None, max_s: float | None = None) -> None:
        _check(default_s, max_s)
        self.default_s = default_s
        self.max_s = max_s

    def update(self, default_s: float | None, max_s: float | None) -> None:
        """Both limits at once, checked first (InvalidArgument: nothing changes). Each call
        reads one of the two, so one between the assignments sees a rule of either."""
        _check(default_s, max_s)
        self.default_s = default_s
        self.max_s = max_s

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DeadlinePolicy):
            return NotImplemented
        return (self.default_s, self.max_s) == (other.default_s, other.max_s)

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"DeadlinePolicy(default_s={self.default_s!r}, max_s={self.max_s!r})"

    def timeout(self, caller_s: float | None) -> float | None:
        """Seconds a call may take: ``caller_s`` (cut to the maximum), else the default.
        DeadlineExceeded when the caller's time is already up (0 or less)."""
        if caller_s is None:
            return self.default_s
        if not caller_s > 0:  # NaN too
            raise DeadlineExceeded("the deadline passed before the call started")
        max_s = self.max_s  # read once: an update may land between two reads
        if max_s is not None and caller_s > max_s:
            return max_s
        return caller_s

    def deadline(self, caller_s: float | None, now: float | None = None) -> float | None:
        """The absolute deadline on the event loop's clock (``loop.time()``, monotonic),
        or None without one; ``now`` defaults to the running loop's time."""
        timeout = self.timeout(caller_s)
        if timeout is None:
            return None
        if now is None:
            now = asyncio.get_running_loop().time()
        return now + timeout


def _check(default_s: float | None, max_s: float | None) -> None:
    for name, value in (("default_s", default_s), ("max_s", max_s)):
        if value is not None and not value > 0:
            raise InvalidArgument(f"deadline {name} must be more than 0 seconds, not {value}")
    if default_s is not None and max_s is not None and default_s > max_s:
        raise InvalidArgument(
            f"the default deadline ({default_s:g}s) is longer than the maximum ({max_s:g}s)"
        )
