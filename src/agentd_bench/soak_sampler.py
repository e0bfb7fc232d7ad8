"""What the soak samples from outside the server: /proc figures of its process tree, /healthz
latency (the event loop's lag as a client sees it) and a loop-lag metric when /metrics has one.
"""

from __future__ import annotations

import http.client
import os
import re
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from agentd_bench.servers import descendants

__all__ = ["HealthProbe", "MetricsReader", "cpu_seconds", "process_tree", "tree_stats"]

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def process_tree(root: int) -> list[int]:
    """``root`` and its descendants (``agentd serve`` runs the gateway in an Envoy child)."""
    return [root, *descendants(root)]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime


def _process(pid: int) -> dict[str, Any] | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    except OSError:  # exited between listing and reading
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    rss_kb = int(fields.get("VmRSS", "0 kB").split()[0])
    return {
        "pid": pid,
        "name": fields.get("Name", "?").strip(),
        "rss_mb": round(rss_kb / 1024, 2),
        "fds": fds,
        "threads": int(fields.get("Threads", "0")),
        "cpu_s": round(cpu_seconds(pid), 2),
    }


def tree_stats(root: int) -> dict[str, Any]:
    """RSS (MB), open descriptors and threads summed over the tree, and per process."""
    processes = [p for pid in process_tree(root) if (p := _process(pid)) is not None]
    return {
        "rss_mb": round(sum(p["rss_mb"] for p in processes), 2),
        "fds": sum(p["fds"] for p in processes),
        "threads": sum(p["threads"] for p in processes),
        "cpu_s": round(sum(p["cpu_s"] for p in processes), 2),
        "processes": processes,
    }


class HealthProbe:
    """GET /healthz every ``every_s`` on one keep-alive connection, in a thread of its own;
    :meth:`take` returns the window's latencies since the last call."""

    def __init__(self, port: int, every_s: float = 0.5, timeout_s: float = 10.0) -> None:
        self._port, self._every_s, self._timeout_s = port, every_s, timeout_s
        self._lock = threading.Lock()
        self._latencies: list[float] = []
        self._errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-healthz", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self._timeout_s + 5)

    def _run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        while not self._stop.wait(self._every_s):
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self._port, timeout=self._timeout_s)
            started = time.perf_counter()
            try:
                conn.request("GET", "/healthz")
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
                error = f"HTTP {response.status}"
            except (OSError, http.client.HTTPException) as exc:
                ok, error = False, f"{type(exc).__name__}: {exc}"
                conn.close()
                conn = None
            elapsed = time.perf_counter() - started
            with self._lock:
                if ok:
                    self._latencies.append(elapsed)
                else:
                    self._errors.append(error)
        if conn is not None:
            conn.close()

    def take(self) -> dict[str, Any]:
        with self._lock:
            latencies, self._latencies = self._latencies, []
            errors, self._errors = self._errors, []
        ms = sorted(x * 1000 for x in latencies)
        return {
            "count": len(ms),
            "errors": len(errors),
            "error_examples": sorted(set(errors))[:3],
            "p50": round(statistics.median(ms), 3) if ms else None,
            "p99": round(ms[max(0, -(-len(ms) * 99 // 100) - 1)], 3) if ms else None,
            "max": round(ms[-1], 3) if ms else None,
        }


class MetricsReader:
    """Reads /metrics each sample: a loop-lag metric if the server exports one (a gauge, or a
    histogram/summary whose mean over the window is taken), agentd_request_errors_total's
    increase (the server's own count, which includes client errors), and per protocol the
    requests the server itself timed at over 1 s in the window."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._previous: dict[str, float] = {}

    def _scrape(self) -> str | None:
        conn = http.client.HTTPConnection("127.0.0.1", self._port, timeout=10)
        try:
            conn.request("GET", "/metrics")
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException):
            return None
        finally:
            conn.close()
        return body.decode("utf-8", "replace") if response.status == 200 else None

    def _delta(self, key: str, value: float) -> float | None:
        before = self._previous.get(key)
        self._previous[key] = value
        return None if before is None else value - before

    def read(self) -> dict[str, Any]:
        text = self._scrape()
        if text is None:
            return {
                "loop_lag_metric_ms": None,
                "metrics_request_errors": None,
                "metrics_over_1s": {},
            }
        sums: dict[str, float] = {}
        gauges: list[tuple[str, float]] = []
        slow: dict[str, float] = {}  # per protocol: requests the server timed at over 1 s
        for line in text.splitlines():
            match = _METRIC_LINE.match(line)
            if match is None:
                continue
            name, value = match.group(1), float(match.group(3))
            sums[name] = sums.get(name, 0.0) + value
            if name == "agentd_request_duration_seconds_bucket":
                labels = dict(_LABEL.findall(match.group(2) or ""))
                sign = {"+Inf": 1, "1.0": -1}.get(labels.get("le", ""), 0)
                protocol = labels.get("protocol", "?")
                slow[protocol] = slow.get(protocol, 0.0) + sign * value
            if "loop_lag" in name and not name.endswith(("_bucket", "_created")):
                gauges.append((name, value))
        lag_ms = None
        hist = [n for n, _ in gauges if n.endswith("_sum")]
        if hist:  # a histogram or summary: mean lag over the window
            base = hist[0][: -len("_sum")]
            total = self._delta(base + "_sum", sums.get(base + "_sum", 0.0))
            count = self._delta(base + "_count", sums.get(base + "_count", 0.0))
            if total is not None and count:
                lag_ms = total / count
        elif gauges:
            lag_ms = max(value for _, value in gauges)
        if lag_ms is not None and "seconds" in (hist[0] if hist else gauges[0][0]):
            lag_ms *= 1000
        errors = self._delta("errors", sums.get("agentd_request_errors_total", 0.0))
        over_1s = {p: self._delta(f"slow:{p}", n) for p, n in sorted(slow.items())}
        return {
            "loop_lag_metric_ms": None if lag_ms is None else round(lag_ms, 3),
            "metrics_request_errors": None if errors is None else int(errors),
            # Compared with the client's latencies: slow on both sides is the server.
            "metrics_over_1s": {p: int(n) for p, n in over_1s.items() if n is not None},
        }
