"""A state store's health: failures since the last success, the latest of them, and the
error log kept to one line per ``log_every_s`` while they go on. Touched only when an
operation fails, when one succeeds after failures, and by ``failing()``."""

from __future__ import annotations

import logging
import time

__all__ = ["StoreHealth"]


class StoreHealth:
    """Failing lasts ``window_s`` after the latest failure unless an operation succeeds
    first: an idle node whose probe says "not ready" gets no traffic, so readiness must
    come back on its own to let a commit try again.

    ``noun`` names what failed in ``failing()`` ("commit", "operation"); ``recovered`` is
    the warning logged on the first success after failures, with their count."""

    __slots__ = (
        "_last_error",
        "_last_failure",
        "_last_log",
        "_log",
        "_logged",
        "_recovered",
        "failures",
        "log_every_s",
        "noun",
        "window_s",
    )

    def __init__(
        self,
        log: logging.Logger,
        *,
        noun: str,
        recovered: str,
        window_s: float,
        log_every_s: float = 10.0,
    ) -> None:
        self._log = log
        self.noun = noun
        self._recovered = recovered
        self.window_s = window_s
        self.log_every_s = log_every_s
        self.failures = 0  # in a row, since the last success
        self._last_failure = 0.0
        self._last_error = ""
        self._logged = 0  # ``failures`` at the last log line
        self._last_log = 0.0

    def failing(self) -> str | None:
        failures = self.failures
        if not failures:
            return None
        ago = time.monotonic() - self._last_failure
        if ago > self.window_s:
            return None
        return (
            f"state store: the last {failures} {self.noun}{'s' if failures > 1 else ''} failed"
            f" (the latest {ago:.1f} s ago): {self._last_error}"
        )

    def succeeded(self) -> None:
        """An operation succeeded (callers test ``failures`` first: the common case costs
        one attribute read)."""
        if self.failures:
            self._log.warning(self._recovered, self.failures)
            self.failures = 0
            self._logged = 0

    def failed(self, what: str, error: str) -> None:
        """``what`` ("commit", "load") failed with ``error`` (one line)."""
        now = time.monotonic()
        self.failures += 1
        self._last_failure = now
        self._last_error = error
        if not self._logged or now - self._last_log >= self.log_every_s:
            # Not a line per failure: a full disk or Redis down fails every batch,
            # thousands a second.
            self._log.error(
                "state store %s failed (%d in a row, %d since the last log line): %s",
                what,
                self.failures,
                self.failures - self._logged,
                error,
            )
            self._logged = self.failures
            self._last_log = now
