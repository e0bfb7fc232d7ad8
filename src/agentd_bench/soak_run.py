"""The soak's open-loop phase: start the generators, sample the server at every window's end,
merge the generators' window reports, and show a live line while it runs."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.live import Live
from rich.text import Text

from agentd_bench.soak_report import COUNTS, kind_point, p99_windows
from agentd_bench.soak_requests import KINDS, REQUEST_TIMEOUT_S
from agentd_bench.soak_sampler import HealthProbe, MetricsReader, cpu_seconds, tree_stats
from agentd_bench.soak_traffic import boundaries

if TYPE_CHECKING:
    from agentd_bench.servers import ServerProcess
    from agentd_bench.soak import Generators, SoakConfig

__all__ = ["SoakRun"]

_EXAMPLES_PER_KIND = 5
Raw = dict[str, dict[str, Any]]  # kind -> counts, latencies, examples


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60:02d}:{seconds % 60:02d}"


class SoakRun:
    """One open-loop run against ``server`` by ``gens``; :meth:`run` returns the samples."""

    def __init__(self, server: ServerProcess, gens: Generators, config: SoakConfig) -> None:
        self.server, self.gens, self.config = server, gens, config
        assert server.pid is not None
        self.pid = server.pid
        self.samples: list[dict[str, Any]] = []
        self.raw: list[Raw] = []
        self._cpu_before: tuple[float, float] | None = None
        self.console = Console(stderr=True, highlight=False)

    def run(self) -> dict[str, Any]:
        port = self.server.port
        probe, metrics = HealthProbe(port), MetricsReader(port)
        metrics.read()  # the first read is the baseline for the deltas
        start_at = self.gens.start()
        probe.start()
        live = Live(console=self.console, transient=True) if self.console.is_terminal else None
        try:
            if live is not None:
                live.start()
            self._wait_until(start_at, start_at, live)
            self.samples.append({"t_s": 0.0, **self._server_stats()})
            self._cpu(self.samples[0]["cpu_s"], 0.0)
            self.raw.append({})
            ends = boundaries(self.config.duration_s, self.config.interval_s)
            for index, offset in enumerate(ends):
                self._wait_until(start_at + offset, start_at, live)
                sample = {"t_s": round(offset, 3), **self._server_stats()}
                seconds = offset - (ends[index - 1] if index else 0.0)
                sample.update(self._cpu(sample["cpu_s"], seconds))
                sample["healthz_ms"] = probe.take()
                sample.update(metrics.read())
                reports = [
                    self.gens.next(i, "window", self.config.interval_s + 60)
                    for i in range(len(self.gens.procs))
                ]
                if any(r["index"] != index for r in reports):
                    raise RuntimeError(f"window reports out of step at window {index}")
                self.raw.append(self._merge(report["kinds"] for report in reports))
                sample["schedule_lag_ms"] = max(r["schedule_lag_ms"] for r in reports)
                sample["generator_in_flight"] = sum(r["in_flight"] for r in reports)
                # The server holds a descriptor per client connection: fds_net leaves out the
                # soak's own (generators' and the health probe's), which follow the load.
                sample["client_connections"] = sum(r["connections"] for r in reports) + 1
                sample["fds_net"] = sample["fds"] - sample["client_connections"]
                sample.update(self._traffic(self.raw[-1], seconds))
                self.samples.append(sample)
                self._show(start_at, live, sampled=True)
            # Requests still in flight at the end land in the last window.
            done = [
                self.gens.next(i, "done", REQUEST_TIMEOUT_S + 60)
                for i in range(len(self.gens.procs))
            ]
            drain = self._merge(d["drain"]["kinds"] for d in done)
            self.raw[-1] = self._merge([self.raw[-1], drain])
            self.samples[-1].update(self._traffic(self.raw[-1], seconds))
        finally:
            probe.stop()
            if live is not None:
                live.stop()
        times = [s["t_s"] for s in self.samples]
        latencies = [{k: v["latencies"] for k, v in raw.items()} for raw in self.raw]
        return {
            "samples": self.samples,
            "swarms": [s for d in done for s in d["swarms"]],
            "totals": self._totals(),
            "p99_windows": p99_windows(
                times, latencies, self.config.window_s, self.config.duration_s
            ),
        }

    def _cpu(self, server_cpu_s: float, seconds: float) -> dict[str, float | None]:
        """CPU use over the window, in % of one core: the server's tree and the generators'
        (a generator near 100% means the client, not the server, set the pace)."""
        generators = sum(cpu_seconds(p.pid) for p in self.gens.procs if p.pid is not None)
        before = self._cpu_before
        self._cpu_before = (server_cpu_s, generators)
        if before is None or seconds <= 0:
            return {"server_cpu_pct": None, "generator_cpu_pct": None}
        return {
            "server_cpu_pct": round((server_cpu_s - before[0]) / seconds * 100, 1),
            "generator_cpu_pct": round((generators - before[1]) / seconds * 100, 1),
        }

    def _server_stats(self) -> dict[str, Any]:
        stats = tree_stats(self.pid)
        try:
            log_bytes = self.server.log_path.stat().st_size
        except OSError:
            log_bytes = 0
        return {**stats, "log_mb": round(log_bytes / 1e6, 3)}

    def _wait_until(self, moment: float, start_at: float, live: Live | None) -> None:
        while (left := moment - time.monotonic()) > 0:
            self.gens.pump(min(left, 1.0))
            self._show(start_at, live, sampled=False)

    def _show(self, start_at: float, live: Live | None, *, sampled: bool) -> None:
        if live is None and not sampled:
            return
        last = self.samples[-1] if self.samples else {}
        current = tree_stats(self.pid) if live is not None else last
        failed = sum(s.get("server_errors", 0) + s.get("timeouts", 0) for s in self.samples)
        line = (
            f"soak {_clock(time.monotonic() - start_at)}/{_clock(self.config.duration_s)}  "
            f"{last.get('requests_per_s', 0):,.0f} req/s  {failed} server errors  "
            f"RSS {current.get('rss_mb', 0):,.0f} MB  fds {current.get('fds', 0)}  "
            f"threads {current.get('threads', 0)}"
        )
        if live is not None:
            live.update(Text(line, style="dim"))
        else:
            self.console.print(line, style="dim", soft_wrap=True)

    @staticmethod
    def _merge(parts: Any) -> Raw:
        merged: Raw = {}
        for kinds in parts:
            for kind, part in kinds.items():
                into = merged.setdefault(kind, {"counts": {}, "latencies": [], "examples": []})
                for name, n in part["counts"].items():
                    into["counts"][name] = into["counts"].get(name, 0) + n
                into["latencies"].extend(part["latencies"])
                for example in part["examples"]:
                    if example not in into["examples"] and len(into["examples"]) < 5:
                        into["examples"].append(example)
        return merged

    @staticmethod
    def _traffic(raw: Raw, seconds: float) -> dict[str, Any]:
        kinds = {
            kind: kind_point(raw[kind]["counts"], raw[kind]["latencies"], seconds)
            if kind in raw
            else kind_point({}, [], seconds)
            for kind in KINDS
        }
        summed = {
            name: sum(point[name] for point in kinds.values())
            for name in ("server_errors", "timeouts", "rejected", "cut", "not_sent")
        }
        return {
            "requests_per_s": round(sum(p["rps"] or 0 for p in kinds.values()), 2),
            **summed,
            "kinds": kinds,
        }

    def _totals(self) -> dict[str, Any]:
        merged = self._merge(self.raw)
        totals: dict[str, Any] = {}
        for kind in KINDS:
            part = merged.get(kind, {"counts": {}, "examples": []})
            totals[kind] = {name: part["counts"].get(name, 0) for name in COUNTS}
            totals[kind]["examples"] = part["examples"][:_EXAMPLES_PER_KIND]
        return totals
