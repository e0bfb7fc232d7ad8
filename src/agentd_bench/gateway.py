"""``agentd bench gateway``: agentd's gateway against grpc.aio and FastAPI+uvicorn.

What is measured, all in one run so that ratios compare like with like:

* unary gRPC ``Invoke`` of the ``echo`` agent over h2c, agentd vs a ``grpc.aio`` server;
* the same call as Connect JSON over HTTP/1.1, agentd vs FastAPI on uvicorn;
* start-up time of ``agentd serve`` until ``/healthz`` answers 200;
* tracing's cost: gRPC ``Invoke`` at 64 in flight with tracing off, on at ratio 0.01 and on
  at 1.0, exporting over OTLP/HTTP to a sink in this process (so the export work is real),
  the modes taking turns for a few rounds (the median, and the spread between rounds).

h2load drives every load point (1, 16 and 64 requests in flight). Only one server runs at a
time, so on a small machine the server under test gets the cores the client does not use.
"""

from __future__ import annotations

import http.client
import http.server
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from agentd_bench import echo, h2load
from agentd_bench.cluster_servers import cpu_seconds
from agentd_bench.errors import INSTALL_HINT, BenchError
from agentd_bench.gateway_report import (
    AGENTD,
    FASTAPI,
    GRPC_AIO,
    SUITE,
    Point,
    build_document,
    fmt_ms,
    render,
)
from agentd_bench.results import machine_info, package_versions, run_and_publish
from agentd_bench.servers import (
    ServerError,
    ServerProcess,
    agentd_env,
    free_port,
    log_tails,
)

__all__ = ["FULL", "QUICK", "SECTIONS", "BenchError", "SuiteConfig", "run_suite"]


@dataclass(frozen=True, slots=True)
class SuiteConfig:
    """How long each point runs; FULL keeps the whole suite near a minute and a half."""

    duration_s: float
    warmup_s: float
    concurrencies: tuple[int, ...] = (1, 16, 64)
    startup_runs: int = 3
    tracing_rounds: int = 3
    # When set, each point sends this many requests per request in flight instead of running
    # for duration_s: it ends as soon as they are answered, and has answers however slow the
    # machine is (a timed run can end before a slow server's first answer).
    requests_per_in_flight: int | None = None

    def requests(self, concurrency: int) -> int | None:
        """The requests one point at ``concurrency`` sends; None: it runs for duration_s."""
        per = self.requests_per_in_flight
        return None if per is None else per * concurrency


FULL = SuiteConfig(duration_s=5.0, warmup_s=1.0)
# Quick: the suite's test of the bench itself (every point runs, nothing is concluded).
QUICK = SuiteConfig(
    duration_s=0.5, warmup_s=0.0, startup_runs=1, tracing_rounds=1, requests_per_in_flight=4
)

# Tracing modes: name, sampler ratio (None: off). Sampled by parentbased_traceidratio, the
# default a collector set-up would use; h2load sends no traceparent, so the ratio decides.
TRACING_MODES: tuple[tuple[str, float | None], ...] = (
    ("off", None),
    ("ratio_0.01", 0.01),
    ("ratio_1", 1.0),
)
TRACING_CONCURRENCY = 64
# The targets: req/s of each mode against off (at least this share).
TRACING_TARGETS = {"ratio_0.01": 0.97, "ratio_1": 0.85}


# ---------------------------------------------------------------- servers


def _agentd_argv(port: int) -> list[str]:
    return [sys.executable, "-m", "agentd", "serve", "--port", str(port)]


def _baseline_argv(module: str, port: int) -> list[str]:
    return [sys.executable, "-m", f"agentd_bench.baselines.{module}", "--port", str(port)]


@contextmanager
def _running(
    name: str,
    argv_for: Callable[[int], list[str]],
    workdir: Path,
    env: dict[str, str] | None = None,
) -> Iterator[int]:
    """Start a server on a free port, wait for its port, yield the port, stop it by PID."""
    with _started(name, argv_for, workdir, env) as server:
        yield server.port


@contextmanager
def _started(
    name: str,
    argv_for: Callable[[int], list[str]],
    workdir: Path,
    env: dict[str, str] | None = None,
) -> Iterator[ServerProcess]:
    """As :func:`_running`, yielding the server (its pid: its CPU time is measured)."""
    port = free_port()
    log = workdir / f"{name.replace('+', '-').replace('.', '-')}.log"
    env = env if env is not None else agentd_env()
    server = ServerProcess(name, argv_for(port), port, log, env=env, cwd=workdir)
    with server:
        try:
            server.wait_listening(timeout=60)
        except ServerError as exc:
            raise BenchError(str(exc)) from exc
        yield server


# ---------------------------------------------------------------- measurements


def measure_point(
    server: str,
    protocol: str,
    port: int,
    concurrency: int,
    config: SuiteConfig,
    binary: str,
) -> Point:
    http1 = protocol == "json"
    spec = h2load.LoadSpec(
        url=f"http://127.0.0.1:{port}{echo.INVOKE_PATH}",
        body=echo.JSON_BODY if http1 else echo.grpc_request_body(),
        headers=echo.JSON_HEADERS if http1 else echo.GRPC_HEADERS,
        concurrency=concurrency,
        duration_s=config.duration_s,
        http1=http1,
        requests=config.requests(concurrency),
    )
    # A separate warm-up run instead of --warm-up-time: h2load counts warm-up bytes in its
    # traffic total, and the gRPC check below needs bytes from the measured window only.
    if config.warmup_s > 0:
        h2load.run_load(h2load.LoadSpec(**{**asdict(spec), "duration_s": config.warmup_s}), binary)
    result = h2load.run_load(spec, binary)
    errors = result.errors
    if not http1:
        # gRPC failures arrive as HTTP 200 with a grpc-status trailer and no message, which
        # h2load counts as success; each good reply carries exactly one echo frame.
        good_replies = result.data_bytes // echo.grpc_reply_frame_len()
        errors += max(0, result.status["2xx"] - good_replies)
    return Point(
        server=server,
        protocol=protocol,
        concurrency=concurrency,
        clients=result.clients,
        streams_per_client=result.streams_per_client,
        requests=result.requests,
        seconds=result.seconds,
        rps=round(result.rps, 1),
        p50_ms=_round(result.latency_ms(50)),
        p99_ms=_round(result.latency_ms(99)),
        errors=errors,
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def measure_startup(workdir: Path, runs: int, timeout: float = 60.0) -> list[float]:
    """Seconds from spawning ``agentd serve`` to the first 200 on ``/healthz``, per run."""
    times: list[float] = []
    for i in range(runs):
        port = free_port()
        log = workdir / f"agentd-startup-{i}.log"
        server = ServerProcess(
            "agentd", _agentd_argv(port), port, log, env=agentd_env(), cwd=workdir
        )
        start = time.perf_counter()
        with server:
            while not _healthz_ok(port):
                try:
                    server.check_alive()
                except ServerError as exc:
                    raise BenchError(str(exc)) from exc
                if time.perf_counter() - start > timeout:
                    raise BenchError(f"agentd did not answer /healthz within {timeout:.0f}s")
                time.sleep(0.01)
            times.append(time.perf_counter() - start)
    return times


def _healthz_ok(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


class _OtlpSink:
    """An OTLP/HTTP receiver on 127.0.0.1: answers every export 200 and counts requests and
    bytes (the node's export work is real; decoding the spans is not the node's cost)."""

    def __init__(self) -> None:
        sink = self
        self.requests = 0
        self.bytes = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                sink.requests += 1
                sink.bytes += len(body)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> _OtlpSink:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def _tracing_env(ratio: float | None, sink: str) -> dict[str, str]:
    env = {k: v for k, v in agentd_env().items() if not k.startswith("OTEL_")}
    if ratio is not None:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = sink
        env["OTEL_TRACES_SAMPLER"] = "parentbased_traceidratio"
        env["OTEL_TRACES_SAMPLER_ARG"] = str(ratio)
    return env


def measure_tracing(
    workdir: Path, config: SuiteConfig, binary: str, progress: Callable[[str], None]
) -> dict[str, Any]:
    """gRPC req/s and p99 at TRACING_CONCURRENCY per tracing mode, the modes taking turns
    for ``config.tracing_rounds`` rounds (a fresh server each), with what each exported."""
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode, _ in TRACING_MODES}
    with _OtlpSink() as sink:
        for round_ in range(config.tracing_rounds):
            for mode, ratio in TRACING_MODES:
                requests, sent = sink.requests, sink.bytes
                name = f"agentd-tracing-{mode.replace('.', '')}"
                env = _tracing_env(ratio, sink.url)
                with _started(name, _agentd_argv, workdir, env) as server:
                    port, pid = server.port, server.pid
                    assert pid is not None
                    echo.verify_grpc(port)
                    try:
                        if config.warmup_s > 0:
                            warm = replace(config, duration_s=config.warmup_s, warmup_s=0)
                            measure_point(AGENTD, "grpc", port, TRACING_CONCURRENCY, warm, binary)
                        # The server's CPU per request: on a shared machine whose speed
                        # swings between runs, steadier than req/s.
                        cpu_before = cpu_seconds(pid)
                        point = measure_point(
                            AGENTD,
                            "grpc",
                            port,
                            TRACING_CONCURRENCY,
                            replace(config, warmup_s=0),
                            binary,
                        )
                        cpu = cpu_seconds(pid) - cpu_before
                    except h2load.H2LoadError as exc:
                        raise BenchError(f"tracing {mode}: {exc}") from exc
                served = point.requests
                # Stopped: its spans are flushed (the node's close shuts the exporter down).
                run = {
                    "rps": point.rps,
                    "p99_ms": point.p99_ms,
                    "errors": point.errors,
                    "cpu_us_per_request": round(cpu / served * 1e6, 2) if served else None,
                    "export_requests": sink.requests - requests,
                    "export_bytes": sink.bytes - sent,
                }
                runs[mode].append(run)
                progress(
                    f"tracing {mode:<10} round {round_ + 1} {point.rps:>10,.0f} req/s  "
                    f"p99 {fmt_ms(point.p99_ms)} ms  cpu {run['cpu_us_per_request']} us/req  "
                    f"exported {run['export_bytes']:,} bytes"
                )
    return tracing_summary(runs)


def tracing_summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per mode: median req/s and p99 over the rounds, the spread of req/s between rounds
    ((max - min) / median), and the ratios against off."""
    modes: dict[str, Any] = {}
    for mode, measured in runs.items():
        rps = [r["rps"] for r in measured]
        p99 = [r["p99_ms"] for r in measured if r["p99_ms"] is not None]
        cpu = [r["cpu_us_per_request"] for r in measured if r.get("cpu_us_per_request")]
        median_rps = statistics.median(rps)
        modes[mode] = {
            "rps": round(median_rps, 1),
            "p99_ms": round(statistics.median(p99), 3) if p99 else None,
            "cpu_us_per_request": round(statistics.median(cpu), 2) if cpu else None,
            "rps_spread": round((max(rps) - min(rps)) / median_rps, 3) if median_rps else None,
            "errors": sum(r["errors"] for r in measured),
            "runs": measured,
        }
    off = modes["off"]
    for mode in modes.values():
        mode["rps_vs_off"] = round(mode["rps"] / off["rps"], 3) if off["rps"] else None
        mode["p99_vs_off"] = (
            round(mode["p99_ms"] / off["p99_ms"], 3)
            if mode["p99_ms"] is not None and off["p99_ms"]
            else None
        )
        # Requests per CPU second against off: req/s on a machine whose cores it had alone.
        mode["cpu_efficiency_vs_off"] = (
            round(off["cpu_us_per_request"] / mode["cpu_us_per_request"], 3)
            if mode["cpu_us_per_request"] and off["cpu_us_per_request"]
            else None
        )
    return {
        "protocol": "grpc",
        "concurrency": TRACING_CONCURRENCY,
        "sampler": "parentbased_traceidratio, OTLP/HTTP to a sink in the bench process",
        "rounds": len(runs["off"]),
        "modes": modes,
    }


def tracing_targets(tracing: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for mode, share in TRACING_TARGETS.items():
        measured = tracing["modes"][mode]
        value = measured["rps_vs_off"] or 0.0
        out.append(
            {
                "name": f"tracing_{mode}",
                "description": f"gRPC req/s with tracing {mode.replace('_', ' ')} >= "
                f"{share:g}x tracing off at {tracing['concurrency']} in flight (median)",
                "value": value,
                "threshold": share,
                "met": value >= share and measured["errors"] == 0,
            }
        )
    return out


def render_tracing(doc: dict[str, Any], console: Console) -> None:
    tracing = doc.get("tracing")
    if not tracing:
        return
    table = Table(
        title=f"tracing: gRPC h2c at {tracing['concurrency']} in flight, "
        f"median of {tracing['rounds']} round(s)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        collapse_padding=True,
    )
    columns = ("mode", "req/s", "spread", "p99 ms", "vs off", "p99 vs off", "cpu us/req")
    for column in (*columns, "req/cpu-s vs off", "exported"):
        table.add_column(column, justify="left" if column == "mode" else "right", no_wrap=True)
    for mode, m in tracing["modes"].items():
        exported = sum(r["export_bytes"] for r in m["runs"])
        table.add_row(
            mode.replace("_", " "),
            f"{m['rps']:,.0f}",
            "-" if m["rps_spread"] is None else f"{m['rps_spread']:.1%}",
            fmt_ms(m["p99_ms"]),
            "-" if m["rps_vs_off"] is None else f"{m['rps_vs_off']:.3f}x",
            "-" if m["p99_vs_off"] is None else f"{m['p99_vs_off']:.3f}x",
            "-" if m.get("cpu_us_per_request") is None else f"{m['cpu_us_per_request']:.1f}",
            "-" if m.get("cpu_efficiency_vs_off") is None else f"{m['cpu_efficiency_vs_off']:.3f}x",
            f"{exported:,} B",
        )
    console.print(table)


# ---------------------------------------------------------------- the suite


def _check_dependencies() -> str:
    missing = [m for m in ("grpc", "fastapi", "uvicorn") if not _importable(m)]
    if missing:
        raise BenchError(f"the gateway benchmark needs {', '.join(missing)}: {INSTALL_HINT}")
    try:
        return h2load.find_h2load()
    except h2load.H2LoadError as exc:
        raise BenchError(str(exc)) from exc


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def collect(config: SuiteConfig, progress: Callable[[str], None]) -> dict[str, Any]:
    """Run every measurement; return the points and start-up times (no files written)."""
    binary = _check_dependencies()
    points: list[Point] = []

    def load(server: str, protocol: str, port: int) -> None:
        for c in config.concurrencies:
            try:
                point = measure_point(server, protocol, port, c, config, binary)
            except h2load.H2LoadError as exc:
                raise BenchError(f"{server} {protocol} c={c}: {exc}") from exc
            progress(
                f"{server:<16} {protocol:<4} c={c:<3} {point.rps:>10,.0f} req/s  "
                f"p99 {fmt_ms(point.p99_ms)} ms  errors {point.errors}"
            )
            points.append(point)

    with tempfile.TemporaryDirectory(prefix="agentd-bench-") as tmp:
        workdir = Path(tmp)
        try:
            progress("measuring agentd serve start-up")
            startup = measure_startup(workdir, config.startup_runs)
            progress("startup " + ", ".join(f"{t:.2f}s" for t in startup))

            with _running(AGENTD, _agentd_argv, workdir) as port:
                echo.verify_grpc(port)
                echo.verify_json(port)
                load(AGENTD, "grpc", port)
                load(AGENTD, "json", port)
            with _running(
                GRPC_AIO, lambda p: _baseline_argv("grpc_aio_server", p), workdir
            ) as port:
                echo.verify_grpc(port)
                load(GRPC_AIO, "grpc", port)
            with _running(FASTAPI, lambda p: _baseline_argv("fastapi_server", p), workdir) as port:
                echo.verify_json(port)
                load(FASTAPI, "json", port)
            tracing = measure_tracing(workdir, config, binary, progress)
        except (BenchError, echo.EchoCheckError) as exc:
            # The temporary directory (and its server logs) goes away; keep the tails.
            raise BenchError(f"{exc}\n{log_tails(workdir)}") from exc
    return {
        "points": points,
        "startup": startup,
        "tracing": tracing,
        "h2load": h2load.h2load_version(binary),
    }


# The sections ``agentd bench gateway --only`` runs alone (written as gateway-<section>-*.json).
SECTIONS = ("tracing",)


def run_suite(
    quick: bool = False,
    json_out: bool = False,
    results_dir: Path | None = None,
    console: Console | None = None,
    only: str | None = None,
) -> dict[str, Any]:
    """Run the suite, write the JSON files, print a table (or the JSON); return the document.
    ``only``: one of SECTIONS, alone (its own files: it does not replace gateway-latest.json).

    Raises BenchError when a server cannot be started or answers wrongly.
    """
    config = QUICK if quick else FULL
    if only is not None:
        if only not in SECTIONS:
            raise BenchError(
                f"unknown gateway section {only!r}; choose from: {', '.join(SECTIONS)}"
            )
        return run_and_publish(
            f"{SUITE}-{only}",
            measure=lambda progress: _collect_tracing(config, progress),
            build=lambda measured, now: _tracing_document(measured, quick, config, now),
            render=render_tracing,
            json_out=json_out,
            results_dir=results_dir,
            console=console,
        )
    return run_and_publish(
        SUITE,
        measure=lambda progress: collect(config, progress),
        build=lambda measured, now: _with_tracing(
            build_document(
                measured,
                quick=quick,
                duration_s=config.duration_s,
                warmup_s=config.warmup_s,
                requests_per_in_flight=config.requests_per_in_flight,
                now=now,
            ),
            measured["tracing"],
        ),
        render=_render,
        json_out=json_out,
        results_dir=results_dir,
        console=console,
    )


def _collect_tracing(config: SuiteConfig, progress: Callable[[str], None]) -> dict[str, Any]:
    binary = _check_dependencies()
    with tempfile.TemporaryDirectory(prefix="agentd-bench-") as tmp:
        workdir = Path(tmp)
        try:
            tracing = measure_tracing(workdir, config, binary, progress)
        except (BenchError, echo.EchoCheckError) as exc:
            raise BenchError(f"{exc}\n{log_tails(workdir)}") from exc
    return {"tracing": tracing, "h2load": h2load.h2load_version(binary)}


def _tracing_document(
    measured: dict[str, Any], quick: bool, config: SuiteConfig, now: datetime
) -> dict[str, Any]:
    """The tracing section's document alone: machine, versions, method, modes, targets."""
    tracing = measured["tracing"]
    return {
        "suite": f"{SUITE}-tracing",
        "timestamp": now.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "quick": quick,
        "machine": machine_info(),
        "versions": {
            **package_versions(["agentd", "pyvoy", "opentelemetry-sdk", "protobuf"]),
            "h2load": measured["h2load"],
        },
        "method": {
            "load_generator": "h2load, 1 thread; one server process at a time",
            "duration_s": config.duration_s,
            "warmup_s": config.warmup_s,
            "requests_per_in_flight": config.requests_per_in_flight,
        },
        "tracing": tracing,
        "targets": tracing_targets(tracing),
    }


def _with_tracing(doc: dict[str, Any], tracing: dict[str, Any]) -> dict[str, Any]:
    doc["tracing"] = tracing
    doc["targets"].extend(tracing_targets(tracing))
    return doc


def _render(doc: dict[str, Any], console: Console) -> None:
    render(doc, console)
    render_tracing(doc, console)
