"""Why a tool call failed: one class per cause, each with a code and a metrics ``kind``.

The code decides the gRPC / HTTP status at the edge; ``kind`` labels the
``agentd_tool_errors_total`` metric. Clients tell the causes apart by code and message:

=====================  ==================  =======================================
class                  code                cause
=====================  ==================  =======================================
ToolNotFound           NOT_FOUND           no tool by that name
ToolArgumentsInvalid   INVALID_ARGUMENT    arguments not a JSON object, or not
                                           matching the tool's parameters
ToolInputTooLarge      RESOURCE_EXHAUSTED  arguments over the size limit
ToolError              UNKNOWN             the tool raised (message: its exception)
ToolResultInvalid      UNKNOWN             the tool returned something not JSON
ToolOutOfFuel          RESOURCE_EXHAUSTED  the CPU budget (fuel) ran out
ToolOutOfMemory        RESOURCE_EXHAUSTED  the memory limit was reached
ToolStackOverflow      RESOURCE_EXHAUSTED  recursion too deep
ToolOutputTooLarge     RESOURCE_EXHAUSTED  the result is over the output limit
ToolDeadlineExceeded   DEADLINE_EXCEEDED   the wall-clock deadline passed
ToolCrashed            INTERNAL            the sandbox trapped for another reason
ToolsUnavailable       UNAVAILABLE         no tool component is loaded
ToolQueueFull          RESOURCE_EXHAUSTED  too many calls waiting (backpressure)
=====================  ==================  =======================================

A tool that raises gets UNKNOWN, the status gRPC servers give an exception escaping a
handler: the call reached the tool and its code failed; the server is fine and the same call
will fail the same way again.
"""

from __future__ import annotations

from agentd.errors import (
    AgentdError,
    Code,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)

__all__ = [
    "ToolArgumentsInvalid",
    "ToolBuildError",
    "ToolCallFailed",
    "ToolCrashed",
    "ToolDeadlineExceeded",
    "ToolError",
    "ToolInputTooLarge",
    "ToolNotFound",
    "ToolOutOfFuel",
    "ToolOutOfMemory",
    "ToolOutputTooLarge",
    "ToolQueueFull",
    "ToolResultInvalid",
    "ToolStackOverflow",
    "ToolsUnavailable",
]


class ToolCallFailed(AgentdError):
    """Mixin marker: every tool failure has a ``kind`` for metrics."""

    kind = "error"


class ToolNotFound(ToolCallFailed, NotFound):
    kind = "not_found"


class ToolArgumentsInvalid(ToolCallFailed, InvalidArgument):
    kind = "invalid_arguments"


class ToolInputTooLarge(ToolCallFailed, ResourceExhausted):
    kind = "input_too_large"


class ToolError(ToolCallFailed):
    """The tool raised an exception; the message is ``"ExcType: message"`` from the tool."""

    code = Code.UNKNOWN
    kind = "raised"


class ToolResultInvalid(ToolError):
    kind = "bad_result"


class ToolOutOfFuel(ToolCallFailed, ResourceExhausted):
    kind = "out_of_fuel"


class ToolOutOfMemory(ToolCallFailed, ResourceExhausted):
    kind = "out_of_memory"


class ToolStackOverflow(ToolCallFailed, ResourceExhausted):
    kind = "stack_overflow"


class ToolOutputTooLarge(ToolCallFailed, ResourceExhausted):
    kind = "output_too_large"


class ToolDeadlineExceeded(ToolCallFailed, DeadlineExceeded):
    kind = "deadline"


class ToolCrashed(ToolCallFailed, Internal):
    kind = "crashed"


class ToolsUnavailable(ToolCallFailed, Unavailable):
    kind = "unavailable"


class ToolQueueFull(ToolCallFailed, ResourceExhausted):
    kind = "queue_full"


class ToolBuildError(FailedPrecondition):
    """The tool component could not be built (componentize-py or the compiler failed)."""
