"""One rooted error tree with transport-neutral codes.

Only the gateway maps a :class:`Code` to an HTTP status or a gRPC status; inner layers raise
these errors and never import a protocol library.
"""

from __future__ import annotations

import enum

__all__ = [
    "AgentdError",
    "Cancelled",
    "Code",
    "ConfigError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "ResourceExhausted",
    "StartupError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
]


class Code(enum.Enum):
    """Status codes shared by every protocol (same meaning as gRPC's)."""

    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16


class AgentdError(Exception):
    """Base of every error agentd raises on purpose; carries a :class:`Code`."""

    code: Code = Code.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Cancelled(AgentdError):
    code = Code.CANCELLED


class InvalidArgument(AgentdError):
    code = Code.INVALID_ARGUMENT


class DeadlineExceeded(AgentdError):
    code = Code.DEADLINE_EXCEEDED


class FailedPrecondition(AgentdError):
    code = Code.FAILED_PRECONDITION


class NotFound(AgentdError):
    code = Code.NOT_FOUND


class ResourceExhausted(AgentdError):
    code = Code.RESOURCE_EXHAUSTED


class Internal(AgentdError):
    code = Code.INTERNAL


class Unavailable(AgentdError):
    code = Code.UNAVAILABLE


class Unauthenticated(AgentdError):
    code = Code.UNAUTHENTICATED


class Unimplemented(AgentdError):
    """The feature asked for is not available here (not built, not configured)."""

    code = Code.UNIMPLEMENTED


class ConfigError(InvalidArgument):
    """A setting is wrong: a flag, an ``AGENTD_*`` variable, the config file, or a file or
    address a setting names. The message is one line naming it (``agentd`` exits 2)."""


class StartupError(Unavailable):
    """The node could not start although its settings are valid: the port is taken, Envoy
    cannot run or did not come up, the open-file limit is too low. The message is one line
    naming the cause (``agentd`` exits 1)."""
