"""What every plugin handler keeps about a load that failed (agents, tools, models,
settings): shown by ``GET /v1/plugins`` and named by ``/readyz``'s detail."""

from __future__ import annotations

import time
from dataclasses import dataclass

from agentd.errors import AgentdError

__all__ = ["ReloadFailure", "describe"]


@dataclass(frozen=True, slots=True)
class ReloadFailure:
    """Why the last load of one plugin failed (the previous version kept serving)."""

    reason: str
    outcome: str  # "failed" (it did not load) or "refused" (it did not verify)
    at: float  # time.time()

    @classmethod
    def now(cls, reason: str, outcome: str = "failed") -> ReloadFailure:
        return cls(reason, outcome, time.time())

    def to_json(self) -> dict[str, object]:
        return {"reason": self.reason, "outcome": self.outcome, "at": self.at}


def describe(exc: BaseException) -> str:
    """One line for why a plugin did not load: a SyntaxError's message and line, an
    AgentdError's message, otherwise the exception's type and text."""
    if isinstance(exc, SyntaxError):
        return f"SyntaxError: {exc.msg} (line {exc.lineno})"
    if isinstance(exc, AgentdError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"
