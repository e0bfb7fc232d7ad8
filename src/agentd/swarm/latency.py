"""A log-bucketed latency histogram: constant memory however many samples it takes."""

from __future__ import annotations

import math

__all__ = ["LatencyHistogram"]

_MIN = 1e-6  # 1 µs
_GROWTH = 1.04  # 4% wide buckets: percentiles within 4%
_LOG_GROWTH = math.log(_GROWTH)
_BUCKETS = int(math.log(1e3 / _MIN) / _LOG_GROWTH) + 2  # up to 1000 s


class LatencyHistogram:
    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * _BUCKETS
        self.total = 0

    def record(self, seconds: float) -> None:
        index = 0 if seconds <= _MIN else int(math.log(seconds / _MIN) / _LOG_GROWTH) + 1
        self.counts[min(index, _BUCKETS - 1)] += 1
        self.total += 1

    def quantile(self, q: float) -> float:
        """The upper edge of the bucket holding quantile ``q`` (seconds); 0 when empty."""
        if not self.total:
            return 0.0
        rank = q * self.total
        seen = 0
        for index, count in enumerate(self.counts):
            seen += count
            if seen >= rank and count:
                return _MIN * _GROWTH**index
        return _MIN * _GROWTH ** (_BUCKETS - 1)
