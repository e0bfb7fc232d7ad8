"""Why a tool call failed: one class, :class:`ToolError`, with a :class:`ToolErrorKind`.

The kind decides the code (so the gRPC / HTTP status at the edge) and labels the
``agentd_tool_errors_total`` metric. Clients tell the causes apart by code and message;
agents by ``exc.kind``:

================  ==================  =============================================
kind              code                cause
================  ==================  =============================================
not_found         NOT_FOUND           no tool by that name
invalid_arguments INVALID_ARGUMENT    arguments not a JSON object, or not matching
                                      the tool's parameters
input_too_large   RESOURCE_EXHAUSTED  arguments over the size limit
raised            UNKNOWN             the tool raised (message: its exception)
bad_result        UNKNOWN             the tool returned something not JSON
out_of_fuel       RESOURCE_EXHAUSTED  the CPU budget (fuel) ran out
out_of_memory     RESOURCE_EXHAUSTED  the memory limit was reached
stack_overflow    RESOURCE_EXHAUSTED  recursion too deep
output_too_large  RESOURCE_EXHAUSTED  the result is over the output limit
deadline          DEADLINE_EXCEEDED   the wall-clock deadline passed
crashed           INTERNAL            the sandbox trapped for another reason
unavailable       UNAVAILABLE         no tool component is loaded
queue_full        RESOURCE_EXHAUSTED  too many calls waiting (backpressure)
================  ==================  =============================================

A tool that raises gets UNKNOWN, the status gRPC servers give an exception escaping a
handler: the call reached the tool and its code failed; the server is fine and the same call
will fail the same way again.

One class rather than one per cause (as before issue 13): the causes differ only in code and
label, and a single ``except ToolError`` with a ``kind`` to match reads better in an agent
than a dozen classes to import.
"""

from __future__ import annotations

import enum

from agentd.errors import AgentdError, Code, FailedPrecondition

__all__ = ["ToolBuildError", "ToolError", "ToolErrorKind"]


class ToolErrorKind(enum.StrEnum):
    """The cause of a failed tool call; the value is the metrics label."""

    NOT_FOUND = "not_found"
    INVALID_ARGUMENTS = "invalid_arguments"
    INPUT_TOO_LARGE = "input_too_large"
    RAISED = "raised"
    BAD_RESULT = "bad_result"
    OUT_OF_FUEL = "out_of_fuel"
    OUT_OF_MEMORY = "out_of_memory"
    STACK_OVERFLOW = "stack_overflow"
    OUTPUT_TOO_LARGE = "output_too_large"
    DEADLINE = "deadline"
    CRASHED = "crashed"
    UNAVAILABLE = "unavailable"
    QUEUE_FULL = "queue_full"

    @property
    def code(self) -> Code:
        """The status code a call failing this way gets."""
        return _CODES[self]


_CODES: dict[ToolErrorKind, Code] = {
    ToolErrorKind.NOT_FOUND: Code.NOT_FOUND,
    ToolErrorKind.INVALID_ARGUMENTS: Code.INVALID_ARGUMENT,
    ToolErrorKind.INPUT_TOO_LARGE: Code.RESOURCE_EXHAUSTED,
    ToolErrorKind.RAISED: Code.UNKNOWN,
    ToolErrorKind.BAD_RESULT: Code.UNKNOWN,
    ToolErrorKind.OUT_OF_FUEL: Code.RESOURCE_EXHAUSTED,
    ToolErrorKind.OUT_OF_MEMORY: Code.RESOURCE_EXHAUSTED,
    ToolErrorKind.STACK_OVERFLOW: Code.RESOURCE_EXHAUSTED,
    ToolErrorKind.OUTPUT_TOO_LARGE: Code.RESOURCE_EXHAUSTED,
    ToolErrorKind.DEADLINE: Code.DEADLINE_EXCEEDED,
    ToolErrorKind.CRASHED: Code.INTERNAL,
    ToolErrorKind.UNAVAILABLE: Code.UNAVAILABLE,
    ToolErrorKind.QUEUE_FULL: Code.RESOURCE_EXHAUSTED,
}


class ToolError(AgentdError):
    """A tool call failed: ``kind`` says why, ``code`` follows from it, ``message`` (always
    starting with ``tool 'NAME'`` when the call named a tool) says what happened."""

    kind: ToolErrorKind

    def __init__(self, kind: ToolErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.code = _CODES[kind]

    def __reduce__(self) -> tuple[type[ToolError], tuple[ToolErrorKind, str]]:
        # Exception pickles its args (the message only); keep the kind.
        return (type(self), (self.kind, self.message))

    def __repr__(self) -> str:
        return f"ToolError(ToolErrorKind.{self.kind.name}, {self.message!r})"


class ToolBuildError(FailedPrecondition):
    """The tool component could not be built (componentize-py or the compiler failed)."""
