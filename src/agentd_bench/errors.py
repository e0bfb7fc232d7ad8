"""The benchmarks' errors, in agentd's one error tree (:mod:`agentd.errors`).

Every error a suite raises on purpose is a :class:`BenchError`, so ``agentd bench`` reports
any of them as one line; each also derives from the :class:`~agentd.errors.AgentdError`
subclass whose code says what went wrong (a server that is not there is ``Unavailable``, a
folder that cannot hold results is an ``InvalidArgument``).
"""

from __future__ import annotations

from agentd.errors import AgentdError, FailedPrecondition

__all__ = ["INSTALL_HINT", "BenchError", "MissingExtra"]

INSTALL_HINT = "pip install 'agentd[bench]'"


class BenchError(AgentdError):
    """A benchmark could not run or finish; the message says why."""


class MissingExtra(BenchError, FailedPrecondition):
    """A module that the ``bench`` extra installs cannot be imported."""

    def __init__(self, missing: list[str]) -> None:
        super().__init__(
            f"agentd bench needs the bench extra (cannot import {', '.join(missing)}):"
            f" {INSTALL_HINT}"
        )
        self.missing = missing
