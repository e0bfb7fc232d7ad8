"""Run h2load (nghttp2's load generator) for a bounded time and parse what it reports.

h2load is used for every server in a comparison so that the client costs the same on both
sides. Throughput and error counts come from its summary; p50/p99 come from its per-request
log (``--log-file``), since the summary only gives min/max/mean/sd.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agentd_bench.errors import BenchError

__all__ = [
    "H2LoadError",
    "LoadResult",
    "LoadSpec",
    "find_h2load",
    "h2load_version",
    "layout",
    "parse_log",
    "parse_summary",
    "percentile",
    "run_load",
]

INSTALL_HINT = "install it with: apt-get install nghttp2-client"

# With HTTP/2 a real client multiplexes many calls over few connections; 4 connections keeps
# the client's per-connection overhead out of the picture while still spreading the load.
MAX_H2_CONNECTIONS = 4


class H2LoadError(BenchError):
    """h2load is missing, failed, or printed what it does not print."""


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """One load point: POST ``body`` to ``url`` with ``concurrency`` requests in flight."""

    url: str
    body: bytes
    headers: Mapping[str, str]
    concurrency: int
    duration_s: float
    http1: bool = False
    # When set, send exactly this many requests instead of running for ``duration_s``.
    requests: int | None = None


@dataclass(slots=True)
class LoadResult:
    clients: int
    streams_per_client: int
    seconds: float
    requests: int  # completed in the measured window
    succeeded: int
    failed: int
    errored: int
    timeouts: int
    status: dict[str, int]  # "2xx" .. "5xx"
    data_bytes: int  # response payload bytes (for gRPC: framed messages)
    rps: float
    latencies_us: list[int] = field(repr=False, default_factory=list)

    @property
    def errors(self) -> int:
        """Requests that did not end in a 2xx response."""
        not_2xx = sum(n for k, n in self.status.items() if k != "2xx")
        return self.failed + self.timeouts + not_2xx

    def latency_ms(self, q: float) -> float | None:
        return None if not self.latencies_us else percentile(self.latencies_us, q) / 1000.0


def find_h2load() -> str:
    path = shutil.which("h2load")
    if path is None:
        raise H2LoadError(f"h2load not found on PATH; {INSTALL_HINT}")
    return path


def h2load_version(binary: str) -> str:
    out = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
    )
    return out.stdout.strip() or out.stderr.strip()


def layout(concurrency: int, http1: bool) -> tuple[int, int]:
    """(connections, streams per connection) giving ``concurrency`` requests in flight.

    HTTP/1.1 gets one connection per in-flight request: h2load's ``-m`` would mean pipelining,
    which real HTTP/1.1 clients do not use.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    if http1:
        return concurrency, 1
    clients = min(concurrency, MAX_H2_CONNECTIONS)
    if concurrency % clients:
        raise ValueError(f"concurrency {concurrency} is not a multiple of {clients} connections")
    return clients, concurrency // clients


def run_load(spec: LoadSpec, binary: str | None = None) -> LoadResult:
    """Run one bounded h2load measurement against ``spec.url`` and return its numbers."""
    binary = binary or find_h2load()
    clients, streams = layout(spec.concurrency, spec.http1)
    with tempfile.TemporaryDirectory(prefix="agentd-h2load-") as tmp:
        body_file = Path(tmp, "body")
        body_file.write_bytes(spec.body)
        # A fresh file each run: h2load appends to an existing log.
        log_file = Path(tmp, "requests.log")
        argv = [
            binary,
            "--clients",
            str(clients),
            "--max-concurrent-streams",
            str(streams),
            "--threads",
            "1",
            *(
                ["--requests", str(spec.requests)]
                if spec.requests is not None
                else ["--duration", f"{max(1, round(spec.duration_s * 1000))}ms"]
            ),
            "--data",
            str(body_file),
            "--log-file",
            str(log_file),
        ]
        for name, value in spec.headers.items():
            argv += ["--header", f"{name}: {value}"]
        if spec.http1:
            argv.append("--h1")
        argv.append(spec.url)
        try:
            # The hard timeout is a backstop; -D already bounds the run.
            out = subprocess.run(
                argv, capture_output=True, text=True, timeout=spec.duration_s + 30, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise H2LoadError(f"h2load did not finish within {spec.duration_s + 30:.0f}s") from exc
        if out.returncode != 0:
            raise H2LoadError(f"h2load exited with {out.returncode}: {out.stderr.strip()[-500:]}")
        summary = parse_summary(out.stdout)
        latencies = parse_log(log_file.read_text()) if log_file.exists() else []
    # A run of a set number of requests lasts as long as they took.
    seconds = spec.duration_s
    if spec.requests is not None:
        seconds = summary["requests"] / summary["rps"] if summary["rps"] else 0.0
    return LoadResult(
        clients=clients,
        streams_per_client=streams,
        seconds=round(seconds, 3),
        latencies_us=latencies,
        **summary,
    )


_FINISHED = re.compile(r"finished in [\d.]+\w*, ([\d.]+) req/s")
_REQUESTS = re.compile(
    r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout"
)
_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
_DATA = re.compile(r"traffic: .*?\((\d+)\) data")


def parse_summary(text: str) -> dict:
    """The counters of h2load's end-of-run summary, as LoadResult fields."""
    found = {
        name: rx.search(text)
        for name, rx in (
            ("finished", _FINISHED),
            ("requests", _REQUESTS),
            ("status", _STATUS),
            ("data", _DATA),
        )
    }
    missing = [name for name, m in found.items() if m is None]
    if missing:
        raise H2LoadError(f"unexpected h2load output (no {', '.join(missing)}): {text[-500:]}")
    _total, done, ok, failed, errored, timeouts = map(int, found["requests"].groups())  # type: ignore[union-attr]
    s2, s3, s4, s5 = map(int, found["status"].groups())  # type: ignore[union-attr]
    return {
        "requests": done,
        "succeeded": ok,
        "failed": failed,
        "errored": errored,
        "timeouts": timeouts,
        "status": {"2xx": s2, "3xx": s3, "4xx": s4, "5xx": s5},
        "data_bytes": int(found["data"].group(1)),  # type: ignore[union-attr]
        "rps": float(found["finished"].group(1)),  # type: ignore[union-attr]
    }


def parse_log(text: str) -> list[int]:
    """Sorted request times in microseconds from h2load's ``--log-file``.

    Each line is ``start_us<TAB>status<TAB>duration_us``. Lines with status 0 (no response
    status seen: reset or cut-off streams) are left out; the summary counts those as failures.
    """
    times: list[int] = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        status, duration = int(parts[1]), int(parts[2])
        if status > 0:
            times.append(duration)
    times.sort()
    return times


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of already sorted values."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])
