"""``agentd bench gateway``: agentd's gateway against grpc.aio and FastAPI+uvicorn.

What is measured, all in one run so that ratios compare like with like:

* unary gRPC ``Invoke`` of the ``echo`` agent over h2c, agentd vs a ``grpc.aio`` server;
* the same call as Connect JSON over HTTP/1.1, agentd vs FastAPI on uvicorn;
* start-up time of ``agentd serve`` until ``/healthz`` answers 200.

h2load drives every load point (1, 16 and 64 requests in flight). Only one server runs at a
time, so on a small machine the server under test gets the cores the client does not use.
"""

from __future__ import annotations

import http.client
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from agentd_bench import echo, h2load
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
from agentd_bench.results import run_and_publish
from agentd_bench.servers import (
    ServerError,
    ServerProcess,
    agentd_env,
    free_port,
    log_tails,
)

__all__ = ["FULL", "QUICK", "BenchError", "SuiteConfig", "run_suite"]


@dataclass(frozen=True, slots=True)
class SuiteConfig:
    """How long each point runs; FULL keeps the whole suite near a minute and a half."""

    duration_s: float
    warmup_s: float
    concurrencies: tuple[int, ...] = (1, 16, 64)
    startup_runs: int = 3


FULL = SuiteConfig(duration_s=5.0, warmup_s=1.0)
QUICK = SuiteConfig(duration_s=1.0, warmup_s=0.3)


# ---------------------------------------------------------------- servers


def _agentd_argv(port: int) -> list[str]:
    return [sys.executable, "-m", "agentd", "serve", "--port", str(port)]


def _baseline_argv(module: str, port: int) -> list[str]:
    return [sys.executable, "-m", f"agentd_bench.baselines.{module}", "--port", str(port)]


@contextmanager
def _running(name: str, argv_for: Callable[[int], list[str]], workdir: Path) -> Iterator[int]:
    """Start a server on a free port, wait for its port, yield the port, stop it by PID."""
    port = free_port()
    log = workdir / f"{name.replace('+', '-').replace('.', '-')}.log"
    server = ServerProcess(name, argv_for(port), port, log, env=agentd_env(), cwd=workdir)
    with server:
        try:
            server.wait_listening(timeout=60)
        except ServerError as exc:
            raise BenchError(str(exc)) from exc
        yield port


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
        except (BenchError, echo.EchoCheckError) as exc:
            # The temporary directory (and its server logs) goes away; keep the tails.
            raise BenchError(f"{exc}\n{log_tails(workdir)}") from exc
    return {
        "points": points,
        "startup": startup,
        "h2load": h2load.h2load_version(binary),
    }


def run_suite(
    quick: bool = False,
    json_out: bool = False,
    results_dir: Path | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the suite, write the JSON files, print a table (or the JSON); return the document.

    Raises BenchError when a server cannot be started or answers wrongly.
    """
    config = QUICK if quick else FULL
    return run_and_publish(
        SUITE,
        measure=lambda progress: collect(config, progress),
        build=lambda measured, now: build_document(
            measured, quick=quick, duration_s=config.duration_s, warmup_s=config.warmup_s, now=now
        ),
        render=render,
        json_out=json_out,
        results_dir=results_dir,
        console=console,
    )
