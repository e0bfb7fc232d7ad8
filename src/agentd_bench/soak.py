"""``agentd bench soak``: a real server under mixed traffic for N minutes, sampled every 10 s.

Starts ``agentd serve`` with the built-in models, agents and tools, measures the capacity of
the traffic mix with a short closed-loop ramp, then drives it open-loop at 80% of that from
generator processes of its own (:mod:`agentd_bench.soak_traffic`), sampling the server from
outside (:mod:`agentd_bench.soak_sampler`). Verdicts, JSON, plot and table are in
:mod:`agentd_bench.soak_report`.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, cast

from rich.console import Console

from agentd_bench import echo
from agentd_bench.errors import INSTALL_HINT, BenchError
from agentd_bench.results import DEFAULT_RESULTS_DIR, run_and_publish, utc_stamp
from agentd_bench.servers import ServerError, ServerProcess, agentd_env, free_port
from agentd_bench.soak_report import SUITE, build_document, plot, render
from agentd_bench.soak_requests import REQUEST_TIMEOUT_S, Target
from agentd_bench.soak_run import SoakRun
from agentd_bench.soak_traffic import RampPlan, SoakPlan, generator_main

__all__ = ["DEFAULT_MINUTES", "QUICK_MINUTES", "BenchError", "SoakConfig", "run_suite"]

DEFAULT_MINUTES = 30.0
QUICK_MINUTES = 0.5
MAX_MINUTES = 24 * 60.0


@dataclass(frozen=True, slots=True)
class SoakConfig:
    minutes: float
    duration_s: float
    interval_s: float  # sampling
    warmup_s: float  # RSS reference and the start of the flatness windows
    window_s: float  # p99 compared over the first and the last window_s
    load_fraction: float
    generators: int
    ramp_levels: tuple[int, ...]  # requests in flight, over all generators
    ramp_level_s: float
    ramp_warmup_s: float
    swarm_agents: int
    swarm_every_s: float
    request_timeout_s: float = REQUEST_TIMEOUT_S
    max_in_flight: int = 256  # per generator; arrivals past it are counted as not sent


def config_for(minutes: float) -> SoakConfig:
    """The run's shape: a 30-minute run samples every 10 s, compares 5-minute windows and
    swarms every minute; a short one scales these to its length (windows are fifths)."""
    if not (math.isfinite(minutes) and 0 < minutes <= MAX_MINUTES):
        raise BenchError(f"--minutes must be above 0 and at most {MAX_MINUTES:g}, not {minutes}")
    duration = minutes * 60
    short = duration < 120
    # Under half a minute (the tests' runs): the capacity ramp shortened to match.
    tiny = duration < 30
    return SoakConfig(
        minutes=minutes,
        duration_s=duration,
        interval_s=10.0 if duration >= 120 else max(1.0, duration / 12),
        warmup_s=min(60.0, duration / 5),
        window_s=min(300.0, duration / 5),
        load_fraction=0.8,
        generators=max(1, min(4, (os.cpu_count() or 1) // 4)),
        ramp_levels=(4, 16, 64),
        ramp_level_s=0.75 if tiny else 1.5 if short else 3.0,
        ramp_warmup_s=0.5 if tiny else 1.0,
        swarm_agents=200 if short else 1000,
        swarm_every_s=min(60.0, duration / 3),
    )


class Generators:
    """Load generator processes (spawned: a fresh interpreter each) and their pipes."""

    def __init__(self, target: Target, plans: list[RampPlan] | list[SoakPlan]) -> None:
        context = multiprocessing.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self._pending: list[deque[dict[str, Any]]] = []
        for i, plan in enumerate(plans):
            parent, child = context.Pipe()
            proc = context.Process(
                target=generator_main, args=(child, target, plan), name=f"soak-gen-{i}"
            )
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
            self._pending.append(deque())

    def pump(self, timeout: float) -> None:
        """Read what the generators sent within ``timeout`` s (so their pipes never fill)."""
        # wait() returns some of the objects it was given: here, connections.
        ready = cast("list[Connection]", wait(self.conns, timeout))
        for conn in ready:
            i = self.conns.index(conn)
            try:
                self._pending[i].append(conn.recv())
            except EOFError:
                self._pending[i].append({"type": "exit"})

    def next(self, i: int, expected: str, timeout: float) -> dict[str, Any]:
        """Generator ``i``'s next message, which must be of type ``expected``."""
        deadline = time.monotonic() + timeout
        while not self._pending[i]:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"load generator {i} sent no {expected!r} in {timeout:.0f} s")
            self.pump(min(left, 1.0))
        message = self._pending[i].popleft()
        if message["type"] == "error":
            raise BenchError(f"load generator {i} failed:\n{message['message']}")
        if message["type"] != expected:
            raise BenchError(f"load generator {i} sent {message['type']!r}, not {expected!r}")
        return message

    def start(self, delay_s: float = 0.5) -> float:
        """Wait until every generator is ready, then give all the same start time."""
        for i in range(len(self.procs)):
            self.next(i, "ready", 120)
        start_at = time.monotonic() + delay_s
        for conn in self.conns:
            conn.send(start_at)
        return start_at

    def close(self) -> None:
        for proc in self.procs:
            proc.join(REQUEST_TIMEOUT_S + 10)
            if proc.is_alive():
                proc.terminate()  # SIGTERM to the PID we started
                proc.join(10)
        for conn in self.conns:
            conn.close()

    def __enter__(self) -> Generators:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BenchError(f"the soak plots with matplotlib: {INSTALL_HINT}") from None


def _build_tools(workdir: Path) -> None:
    """Build (or find) the tool component first: a build inside serve's start would count
    against the start-up timeout."""
    done = subprocess.run(
        [sys.executable, "-m", "agentd", "tools", "build"],
        env=agentd_env(),
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode != 0:
        raise BenchError(f"agentd tools build failed:\n{(done.stderr or done.stdout)[-2000:]}")


def _wait_ready(server: ServerProcess, timeout: float = 120.0) -> None:
    try:
        server.wait_listening(timeout)
    except ServerError as exc:
        raise BenchError(f"{exc}\n{_log_tail(server.log_path)}") from None
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{server.port}/readyz"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"agentd not ready in {timeout:.0f} s\n{_log_tail(server.log_path)}")
        time.sleep(0.2)
    try:
        echo.verify_grpc(server.port)
    except echo.EchoCheckError as exc:
        raise BenchError(f"{exc}\n{_log_tail(server.log_path)}") from None


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _log_summary(path: Path) -> dict[str, Any]:
    text = path.read_text(errors="replace") if path.exists() else ""
    tracebacks = text.count("Traceback (most recent call last)")
    errors = sum(" ERROR " in line for line in text.splitlines())
    return {
        "log_bytes": len(text.encode()),
        "log_lines": text.count("\n"),
        "tracebacks": tracebacks,
        "never_retrieved": text.count("exception was never retrieved"),
        "error_lines": errors,
        "tail": _log_tail(path, 30).splitlines() if tracebacks or errors else [],
    }


def measure_capacity(
    target: Target, config: SoakConfig, progress: Any, seed: int = 0
) -> dict[str, Any]:
    """Closed loop at each level; the capacity is the best level's answered req/s."""
    per_generator = tuple(max(1, n // config.generators) for n in config.ramp_levels)
    plans = [
        RampPlan(per_generator, config.ramp_level_s, config.ramp_warmup_s, seed=seed + i)
        for i in range(config.generators)
    ]
    seconds = config.ramp_warmup_s + config.ramp_level_s * len(per_generator)
    progress(
        f"capacity: closed loop at {', '.join(map(str, config.ramp_levels))} in flight, "
        f"{seconds:.0f} s ..."
    )
    with Generators(target, plans) as gens:
        gens.start()
        reports = [gens.next(i, "ramp", seconds + 120) for i in range(config.generators)]
    levels = []
    for index, in_flight in enumerate(config.ramp_levels):
        parts = [r["levels"][index] for r in reports]
        counts: dict[str, int] = {}
        for part in parts:
            for kind in part["window"]["kinds"].values():
                for name, n in kind["counts"].items():
                    counts[name] = counts.get(name, 0) + n
        completed = sum(p["completed"] for p in parts)
        levels.append(
            {"in_flight": in_flight, "rps": round(completed / parts[0]["seconds"], 1), **counts}
        )
    best = max(level["rps"] for level in levels)
    if best <= 0:
        raise BenchError(f"no request was answered during the capacity ramp: {levels}")
    return {"levels": levels, "rps": best, "target_rps": round(best * config.load_fraction, 1)}


def collect(config: SoakConfig, progress: Any, seed: int = 0) -> dict[str, Any]:
    """Start the server, find the capacity, run the soak; the measured part of the document."""
    _require_matplotlib()
    workdir = Path(tempfile.mkdtemp(prefix="agentd-soak-"))
    try:
        progress("building (or finding) the tool component ...")
        _build_tools(workdir)
        (workdir / "state").mkdir()
        port = free_port()
        log = workdir / "agentd.log"
        env = {**agentd_env(), "AGENTD_STATE_PATH": str(workdir / "state" / "agents.db")}
        argv = [sys.executable, "-m", "agentd", "serve", "--port", str(port)]
        server = ServerProcess("agentd", argv, port, log, env=env, cwd=workdir)
        load_before = [round(x, 2) for x in os.getloadavg()]
        server.start()
        try:
            progress(f"agentd serve on port {port} (PID {server.pid}) ...")
            _wait_ready(server)
            target = Target("127.0.0.1", port)
            capacity = measure_capacity(target, config, progress, seed)
            progress(
                f"capacity {capacity['rps']:g} req/s; soak at {capacity['target_rps']:g} req/s "
                f"for {config.minutes:g} min, a sample every {config.interval_s:g} s ..."
            )
            plans = _soak_plans(config, capacity["target_rps"], seed)
            with Generators(target, plans) as gens:
                measured = SoakRun(server, gens, config).run()
        finally:
            exit_code = server.stop()
        return {
            "config": asdict(config),
            "load_average_before": load_before,
            "capacity": capacity,
            **measured,
            "server": {"exit_code": exit_code, **_log_summary(log)},
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _soak_plans(config: SoakConfig, rate: float, seed: int) -> list[SoakPlan]:
    return [
        SoakPlan(
            rate=rate / config.generators,
            duration_s=config.duration_s,
            interval_s=config.interval_s,
            seed=seed + 100 + i,
            max_in_flight=config.max_in_flight,
            swarm_agents=config.swarm_agents if i == 0 else 0,  # one generator runs swarms
            swarm_first_s=config.swarm_every_s / 2,
            swarm_every_s=config.swarm_every_s,
        )
        for i in range(config.generators)
    ]


def run_suite(
    quick: bool = False,
    json_out: bool = False,
    results_dir: Path | None = None,
    console: Console | None = None,
    minutes: float | None = None,
) -> dict[str, Any]:
    """Run the soak for ``minutes`` (default 30; ``quick``: 0.5) and publish its results."""
    config = config_for(
        minutes if minutes is not None else QUICK_MINUTES if quick else DEFAULT_MINUTES
    )
    folder = results_dir or DEFAULT_RESULTS_DIR

    def build(measured: dict[str, Any], now: Any) -> dict[str, Any]:
        stamp = utc_stamp(now)
        iso = now.isoformat(timespec="seconds").replace("+00:00", "Z")
        document = build_document(measured, now_iso=iso, quick=quick)
        png = folder / f"{SUITE}-{stamp}.png"
        plot(document, png)
        shutil.copyfile(png, folder / f"{SUITE}-latest.png")
        document["plot"] = str(png)
        return document

    return run_and_publish(
        SUITE,
        measure=lambda progress: collect(config, progress),
        build=build,
        render=render,
        json_out=json_out,
        results_dir=results_dir,
        console=console,
    )
