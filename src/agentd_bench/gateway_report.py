"""Results of the gateway suite: the point record, ratios, target verdicts, JSON and table."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from agentd_bench.results import machine_info, package_versions

__all__ = [
    "AGENTD",
    "BASELINE",
    "FASTAPI",
    "GRPC_AIO",
    "SUITE",
    "Point",
    "build_document",
    "fmt_ms",
    "ratios",
    "render",
    "targets",
]

SUITE = "gateway"
AGENTD = "agentd"
GRPC_AIO = "grpc.aio"
FASTAPI = "fastapi+uvicorn"
# The peer each agentd protocol is compared with.
BASELINE = {"grpc": GRPC_AIO, "json": FASTAPI}

# The targets from the issue; reported whether met or not.
GRPC_RPS_TARGET = 1.5
JSON_RPS_TARGET = 1.0
STARTUP_TARGET_S = 2.0
TARGET_CONCURRENCY = 64


@dataclass(slots=True)
class Point:
    """One load point: a server, a protocol and a number of requests in flight."""

    server: str
    protocol: str  # "grpc" (h2c) or "json" (Connect JSON over HTTP/1.1)
    concurrency: int
    clients: int
    streams_per_client: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    errors: int


def _find(points: list[Point], server: str, protocol: str, c: int) -> Point | None:
    for p in points:
        if (p.server, p.protocol, p.concurrency) == (server, protocol, c):
            return p
    return None


def ratios(points: list[Point]) -> dict[str, dict[str, dict[str, float | None]]]:
    """agentd over baseline, per protocol and concurrency: req/s ratio and p99 ratio."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for protocol, baseline in BASELINE.items():
        per_c: dict[str, dict[str, float | None]] = {}
        for p in points:
            if p.server != AGENTD or p.protocol != protocol:
                continue
            base = _find(points, baseline, protocol, p.concurrency)
            if base is None:
                continue
            per_c[str(p.concurrency)] = {
                "rps": round(p.rps / base.rps, 3) if base.rps else None,
                "p99": round(p.p99_ms / base.p99_ms, 3)
                if p.p99_ms is not None and base.p99_ms
                else None,
            }
        out[protocol] = per_c
    return out


def targets(points: list[Point], startup: list[float]) -> list[dict[str, Any]]:
    c = TARGET_CONCURRENCY
    out: list[dict[str, Any]] = []

    ours, base = _find(points, AGENTD, "grpc", c), _find(points, GRPC_AIO, "grpc", c)
    if ours and base:
        rps_ratio = ours.rps / base.rps if base.rps else 0.0
        p99_ok = ours.p99_ms is not None and base.p99_ms is not None and ours.p99_ms <= base.p99_ms
        out.append(
            {
                "name": "grpc_vs_grpc_aio",
                "description": f"gRPC req/s >= {GRPC_RPS_TARGET}x grpc.aio at {c} in flight, "
                "p99 no worse",
                "value": round(rps_ratio, 3),
                "threshold": GRPC_RPS_TARGET,
                "p99_ms": ours.p99_ms,
                "baseline_p99_ms": base.p99_ms,
                "met": rps_ratio >= GRPC_RPS_TARGET and p99_ok and ours.errors == base.errors == 0,
            }
        )

    ours, base = _find(points, AGENTD, "json", c), _find(points, FASTAPI, "json", c)
    if ours and base:
        rps_ratio = ours.rps / base.rps if base.rps else 0.0
        out.append(
            {
                "name": "json_vs_fastapi",
                "description": f"Connect JSON req/s >= {JSON_RPS_TARGET}x FastAPI+uvicorn "
                f"at {c} in flight",
                "value": round(rps_ratio, 3),
                "threshold": JSON_RPS_TARGET,
                "met": rps_ratio >= JSON_RPS_TARGET and ours.errors == base.errors == 0,
            }
        )

    if startup:
        median = statistics.median(startup)
        out.append(
            {
                "name": "startup",
                "description": (
                    f"agentd serve to first /healthz 200 < {STARTUP_TARGET_S:g} s (median)"
                ),
                "value": round(median, 3),
                "threshold": STARTUP_TARGET_S,
                "met": median < STARTUP_TARGET_S,
            }
        )
    return out


def build_document(
    measured: dict[str, Any],
    *,
    quick: bool,
    duration_s: float,
    warmup_s: float,
    now: datetime,
    requests_per_in_flight: int | None = None,
) -> dict[str, Any]:
    """The JSON document of one run: machine, versions, method, points, ratios, targets."""
    points: list[Point] = measured["points"]
    startup: list[float] = measured["startup"]
    return {
        "suite": SUITE,
        "timestamp": now.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "quick": quick,
        "machine": machine_info(),
        "versions": {
            **package_versions(
                [
                    "agentd",
                    "pyvoy",
                    "connect-python",
                    "protobuf",
                    "grpcio",
                    "fastapi",
                    "uvicorn",
                    "uvloop",
                    "httptools",
                ]
            ),
            "h2load": measured["h2load"],
        },
        "method": {
            "load_generator": "h2load, 1 thread; one server process at a time",
            "grpc": "h2c, N in flight as min(N, 4) connections x N/connections streams",
            "json": "HTTP/1.1 (--h1), N connections x 1 request, no pipelining",
            "duration_s": duration_s,
            "warmup_s": warmup_s,
            # Set (--quick): each point sent this many requests per request in flight,
            # duration_s not used.
            "requests_per_in_flight": requests_per_in_flight,
            "latency": "per-request times from h2load --log-file, nearest-rank percentiles",
        },
        "points": [asdict(p) for p in points],
        "ratios": ratios(points),
        "startup": {
            "runs_s": [round(t, 3) for t in startup],
            "min_s": round(min(startup), 3) if startup else None,
            "median_s": round(statistics.median(startup), 3) if startup else None,
        },
        "targets": targets(points, startup),
    }


# ---------------------------------------------------------------- output


def fmt_ms(value: float | None) -> str:
    """Milliseconds for a table cell; '-' when there was nothing to measure."""
    return "-" if value is None else f"{value:.2f}"


def point_row(point: dict[str, Any], label: str, ratio: float | None) -> list[str]:
    """One load point as table cells: label, in flight, server, req/s, p50, p99, errors,
    ratio against the peer (agentd rows only)."""
    errors = point["errors"]
    return [
        label,
        str(point["concurrency"]),
        point["server"],
        f"{point['rps']:,.0f}",
        fmt_ms(point["p50_ms"]),
        fmt_ms(point["p99_ms"]),
        str(errors) if errors == 0 else f"[red]{errors}[/red]",
        "" if ratio is None else f"{ratio:.2f}x",
    ]


def render(doc: dict[str, Any], console: Console) -> None:
    """The result table, start-up times and target verdicts, for a terminal."""
    # No vertical rules and no edge padding: the table fits 80 columns (pipes, CI logs).
    table = Table(
        title="agentd bench gateway: unary echo Invoke",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        collapse_padding=True,
    )
    table.add_column("protocol", no_wrap=True)
    table.add_column("in flight", justify="right", no_wrap=True)
    table.add_column("server", no_wrap=True)
    table.add_column("req/s", justify="right", no_wrap=True)
    table.add_column("p50 ms", justify="right", no_wrap=True)
    table.add_column("p99 ms", justify="right", no_wrap=True)
    table.add_column("errors", justify="right", no_wrap=True)
    table.add_column("vs peer", justify="right", no_wrap=True)
    labels = {"grpc": "gRPC h2c", "json": "JSON h1"}
    rows = sorted(
        doc["points"], key=lambda p: (p["protocol"], p["concurrency"], p["server"] != AGENTD)
    )
    previous = None
    for p in rows:
        key = (p["protocol"], p["concurrency"])
        if previous is not None and key != previous:
            table.add_section()
        previous = key
        ratio = None
        if p["server"] == AGENTD:
            ratio = doc["ratios"].get(p["protocol"], {}).get(str(p["concurrency"]), {}).get("rps")
        table.add_row(*point_row(p, labels.get(p["protocol"], p["protocol"]), ratio))
    console.print(table)

    startup = doc["startup"]
    console.print(
        f"startup (agentd serve → /healthz 200): min {startup['min_s']:.2f}s, "
        f"median {startup['median_s']:.2f}s over {len(startup['runs_s'])} runs"
    )
    for t in doc["targets"]:
        mark = "[green]met[/green]" if t["met"] else "[red]not met[/red]"
        detail = f"{t['value']:.2f}x" if t["name"] != "startup" else f"{t['value']:.2f}s"
        if "p99_ms" in t:
            detail += f", p99 {fmt_ms(t['p99_ms'])} vs {fmt_ms(t['baseline_p99_ms'])} ms"
        console.print(f"target {t['description']}: {detail} — {mark}", soft_wrap=True)
    m = doc["machine"]
    console.print(
        f"[dim]{m['cpus_usable']} CPUs ({m['cpu_model']}), Python {m['python']}, "
        f"{doc['versions']['h2load']}; client and servers share the machine[/dim]",
        soft_wrap=True,
    )
