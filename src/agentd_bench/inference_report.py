"""Results of the inference suite: the point record, ratios, target verdicts, JSON and table."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from agentd_bench.gateway_report import fmt_ms, point_row
from agentd_bench.results import machine_info, package_versions

__all__ = [
    "AGENTD",
    "COMPARED",
    "MLSERVER",
    "SUITE",
    "Point",
    "build_document",
    "ratios",
    "render",
    "targets",
]

SUITE = "inference"
AGENTD = "agentd"
MLSERVER = "mlserver"
# Protocols both servers speak; "rest_binary" (the binary tensor extension) is agentd only.
COMPARED = ("grpc", "rest")
LABELS = {"grpc": "gRPC h2c", "rest": "JSON h1", "rest_binary": "binary h1"}
DESCRIPTIONS = {"grpc": "KServe gRPC", "rest": "KServe REST (JSON)"}

# The targets from the issue; reported whether met or not.
RPS_TARGET = 3.0
TARGET_CONCURRENCY = 64


@dataclass(slots=True)
class Point:
    """One load point: a model, a server, a protocol and a number of requests in flight."""

    model: str
    server: str
    protocol: str  # "grpc", "rest" (JSON) or "rest_binary" (binary tensor extension)
    concurrency: int
    clients: int
    streams_per_client: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    errors: int


def _find(points: list[Point], model: str, server: str, protocol: str, c: int) -> Point | None:
    for p in points:
        if (p.model, p.server, p.protocol, p.concurrency) == (model, server, protocol, c):
            return p
    return None


def _models(points: list[Point]) -> list[str]:
    return list(dict.fromkeys(p.model for p in points))


def ratios(points: list[Point]) -> dict[str, dict[str, dict[str, dict[str, float | None]]]]:
    """agentd over MLServer per model, protocol and concurrency: req/s ratio and p99 ratio."""
    out: dict[str, dict[str, dict[str, dict[str, float | None]]]] = {}
    for model in _models(points):
        per_protocol: dict[str, dict[str, dict[str, float | None]]] = {}
        for protocol in COMPARED:
            per_c: dict[str, dict[str, float | None]] = {}
            for p in points:
                if (p.model, p.server, p.protocol) != (model, AGENTD, protocol):
                    continue
                base = _find(points, model, MLSERVER, protocol, p.concurrency)
                if base is None:
                    continue
                per_c[str(p.concurrency)] = {
                    "rps": round(p.rps / base.rps, 3) if base.rps else None,
                    "p99": round(p.p99_ms / base.p99_ms, 3)
                    if p.p99_ms is not None and base.p99_ms
                    else None,
                }
            if per_c:
                per_protocol[protocol] = per_c
        out[model] = per_protocol
    return out


def targets(points: list[Point], models: list[str]) -> list[dict[str, Any]]:
    """One verdict per model and compared protocol: >= 3x MLServer's req/s at 64, p99 no worse.

    A comparison with a missing side (agentd's KServe routes absent) or with errors on
    either side is reported as not met.
    """
    c = TARGET_CONCURRENCY
    out: list[dict[str, Any]] = []
    for model in models:
        for protocol in COMPARED:
            ours = _find(points, model, AGENTD, protocol, c)
            base = _find(points, model, MLSERVER, protocol, c)
            entry: dict[str, Any] = {
                "name": f"{model}_{protocol}_vs_mlserver",
                "description": f"{model} {DESCRIPTIONS[protocol]}: req/s >= "
                f"{RPS_TARGET:g}x MLServer at {c} in flight, p99 no worse",
                "threshold": RPS_TARGET,
            }
            if ours is None or base is None:
                missing = "agentd" if ours is None else "MLServer"
                out.append({**entry, "value": None, "met": False, "note": f"no {missing} point"})
                continue
            rps_ratio = ours.rps / base.rps if base.rps else 0.0
            p99_ok = (
                ours.p99_ms is not None and base.p99_ms is not None and ours.p99_ms <= base.p99_ms
            )
            out.append(
                {
                    **entry,
                    "value": round(rps_ratio, 3),
                    "p99_ms": ours.p99_ms,
                    "baseline_p99_ms": base.p99_ms,
                    "met": rps_ratio >= RPS_TARGET and p99_ok and ours.errors == base.errors == 0,
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
    models: list[dict[str, Any]] = measured["models"]
    zero_copy: dict[str, Any] = measured["zero_copy"]
    model_names = [m["name"] for m in models]
    verdicts = targets(points, model_names)
    verdicts.append(zero_copy["target"])
    return {
        "suite": SUITE,
        "timestamp": now.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "quick": quick,
        "machine": machine_info(),
        # 1, 5 and 15 minute load averages around the run: the suite itself adds about 2.
        "load_average": measured["load_average"],
        "versions": {
            **package_versions(
                ["agentd", "onnxruntime", "numpy", "protobuf", "tritonclient", "pyvoy"]
            ),
            "mlserver": measured["mlserver_versions"].get("mlserver"),
            "mlserver_onnxruntime": measured["mlserver_versions"].get("onnxruntime"),
            "h2load": measured["h2load"],
        },
        "method": {
            "load_generator": "h2load, 1 thread; both servers run, one is loaded at a time, "
            "and their points for the same model, protocol and concurrency run back to back",
            "requests": "batch 1: one row per request, the same seeded row every time",
            "grpc": "KServe v2 ModelInfer over h2c with raw_input_contents; N in flight as "
            "min(N, 4) connections x N/connections streams",
            "rest": "POST /v2/models/NAME/infer, JSON tensor data, HTTP/1.1 (--h1), "
            "N connections x 1 request, no pipelining",
            "rest_binary": "agentd only: the same over the binary tensor data extension "
            "(Inference-Header-Content-Length), JSON reply",
            "duration_s": duration_s,
            "warmup_s": warmup_s,
            # Set (--quick): each point sent this many requests per request in flight,
            # duration_s not used.
            "requests_per_in_flight": requests_per_in_flight,
            "latency": "per-request times from h2load --log-file, nearest-rank percentiles",
            "errors": "failed, timed out or non-2xx requests; for gRPC also 200 replies "
            "without a reply message (grpc-status travels in trailers, which h2load does not "
            "read), found by comparing response bytes with the size of one checked reply",
            "checks": "before loading, one real call per server, model and protocol "
            "(tritonclient for gRPC, http.client for REST) must match a direct onnxruntime run",
            "mlserver": measured["mlserver_config"],
        },
        "models": models,
        "agentd_kserve": measured["agentd_kserve"],
        "points": [asdict(p) for p in points],
        "ratios": ratios(points),
        "zero_copy": zero_copy,
        "targets": verdicts,
    }


# ---------------------------------------------------------------- output


def render(doc: dict[str, Any], console: Console) -> None:
    """One result table per model, the zero-copy numbers and target verdicts, for a terminal."""
    order = {"grpc": 0, "rest": 1, "rest_binary": 2}
    for model in doc["models"]:
        name = model["name"]
        # No vertical rules and no edge padding: the table fits 80 columns (pipes, CI logs).
        table = Table(
            title=f"agentd bench inference: {name}, batch-1 KServe v2 requests",
            title_justify="left",
            box=box.SIMPLE_HEAD,
            show_edge=False,
            collapse_padding=True,
        )
        for column, justify in [
            ("protocol", "left"),
            ("in flight", "right"),
            ("server", "left"),
            ("req/s", "right"),
            ("p50 ms", "right"),
            ("p99 ms", "right"),
            ("errors", "right"),
            ("vs MLServer", "right"),
        ]:
            table.add_column(column, justify=justify, no_wrap=True)  # type: ignore[arg-type]
        rows = sorted(
            (p for p in doc["points"] if p["model"] == name),
            key=lambda p: (order.get(p["protocol"], 9), p["concurrency"], p["server"] != AGENTD),
        )
        previous = None
        for p in rows:
            key = p["protocol"]
            if previous is not None and key != previous:
                table.add_section()
            previous = key
            ratio = None
            if p["server"] == AGENTD:
                by_c = doc["ratios"].get(name, {}).get(p["protocol"], {})
                ratio = by_c.get(str(p["concurrency"]), {}).get("rps")
            table.add_row(*point_row(p, LABELS.get(p["protocol"], p["protocol"]), ratio))
        console.print(table)
        console.print()
    if doc["agentd_kserve"] != "ok":
        console.print(f"[yellow]agentd not measured: {doc['agentd_kserve']}[/yellow]")

    z = doc["zero_copy"]
    mb = z["tensor"]["bytes"] / 2**20
    console.print(
        f"zero-copy, {mb:g} MiB FP32 tensor: input path {z['input_path_us']['zero_copy']:.1f} µs "
        f"vs copy {z['input_path_us']['copy']:.1f} µs "
        f"({z['speedup']['input_path_vs_copy']:.1f}x; list decoding "
        f"{z['input_path_us']['list_decode'] / 1000:.1f} ms); full run "
        f"{z['full_run_us']['zero_copy']:.0f} vs {z['full_run_us']['copy']:.0f} µs "
        f"({z['speedup']['full_run_vs_copy']:.2f}x)",
        soft_wrap=True,
    )
    for t in doc["targets"]:
        mark = "[green]met[/green]" if t["met"] else "[red]not met[/red]"
        detail = "-" if t["value"] is None else f"{t['value']:.2f}x"
        if "p99_ms" in t:
            detail += f", p99 {fmt_ms(t['p99_ms'])} vs {fmt_ms(t['baseline_p99_ms'])} ms"
        if "note" in t:
            detail += f" ({t['note']})"
        console.print(f"target {t['description']}: {detail} — {mark}", soft_wrap=True)
    m = doc["machine"]
    v = doc["versions"]
    console.print(
        f"[dim]{m['cpus_usable']} CPUs ({m['cpu_model']}), Python {m['python']}, onnxruntime "
        f"{v['onnxruntime']}, MLServer {v['mlserver']}, {v['h2load']}; client and servers "
        f"share the machine; load average {doc['load_average']['before'][0]:.1f} before, "
        f"{doc['load_average']['after'][0]:.1f} after[/dim]",
        soft_wrap=True,
    )
