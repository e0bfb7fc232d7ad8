"""The soak's verdicts, JSON document, plot and summary table, from its samples.

Pure functions over what :mod:`agentd_bench.soak` measured; matplotlib is imported only to
draw (``Agg``, no display needed).
"""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from agentd_bench.results import machine_info, package_versions
from agentd_bench.soak_requests import KINDS, MIX

__all__ = [
    "COUNTS",
    "SUITE",
    "build_document",
    "kind_point",
    "p99_windows",
    "percentile_ms",
    "plot",
    "render",
    "targets",
]

SUITE = "soak"
COUNTS = ("sent", "ok", "cut", "server_errors", "timeouts", "rejected", "client_errors", "not_sent")
MAX_RSS_GROWTH_PCT = 5.0
MAX_P99_RATIO = 1.2
# "Flat": the last window's median may exceed the first's by this much, no more.
FLAT_TOLERANCE = {"fds_net": (8, 0.05), "threads": (2, 0.05)}  # (absolute, relative)
MIN_LATENCIES = 20  # fewer in a window and its p99 is one or two requests: not compared


def percentile_ms(latencies: list[float], p: float) -> float | None:
    """Nearest-rank percentile of ``latencies`` (seconds), in ms; None when empty."""
    if not latencies:
        return None
    ordered = sorted(latencies)
    rank = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
    return round(ordered[rank] * 1000, 3)


def kind_point(counts: dict[str, int], latencies: list[float], seconds: float) -> dict[str, Any]:
    """One kind's figures for one window."""
    point: dict[str, Any] = {name: counts.get(name, 0) for name in COUNTS}
    answered = point["ok"] + point["cut"]
    point["rps"] = round(answered / seconds, 2) if seconds > 0 else None
    point["p50_ms"] = percentile_ms(latencies, 50)
    point["p99_ms"] = percentile_ms(latencies, 99)
    return point


def p99_windows(
    times: list[float], latencies: list[dict[str, list[float]]], window_s: float, end_s: float
) -> dict[str, Any]:
    """Per kind, p99 over the samples ending in ``(0, window_s]`` and in ``(end - window, end]``
    (``times[i]`` is when sample ``i``'s window ended)."""
    first = [i for i, t in enumerate(times) if t <= window_s + 1e-6]
    last = [i for i, t in enumerate(times) if t > end_s - window_s + 1e-6]
    result: dict[str, Any] = {}
    for kind in KINDS:
        a = [x for i in first for x in latencies[i].get(kind, ())]
        b = [x for i in last for x in latencies[i].get(kind, ())]
        p_first, p_last = percentile_ms(a, 99), percentile_ms(b, 99)
        compared = len(a) >= MIN_LATENCIES and len(b) >= MIN_LATENCIES
        ratio = round(p_last / p_first, 3) if compared and p_first and p_last else None
        result[kind] = {
            "first_n": len(a),
            "last_n": len(b),
            "first_p99_ms": p_first,
            "last_p99_ms": p_last,
            "ratio": ratio,
        }
    return result


def _flat(
    samples: list[dict[str, Any]], key: str, warmup_s: float, name: str, what: str
) -> dict[str, Any]:
    after = [s[key] for s in samples if s["t_s"] >= warmup_s - 1e-6 and s.get(key) is not None]
    width = max(1, len(after) // 5)
    first = statistics.median(after[:width]) if after else None
    last = statistics.median(after[-width:]) if after else None
    absolute, relative = FLAT_TOLERANCE[key]
    allowed = max(absolute, relative * first) if first is not None else None
    change = None if first is None or last is None else last - first
    return {
        "name": name,
        "description": f"{what} flat after warm-up: the median of the last fifth of samples "
        f"at most max({absolute}, {relative:.0%}) above the first fifth's",
        "value": change,
        "threshold": allowed,
        "first": first,
        "last": last,
        "samples_per_window": width,
        "met": change is not None and allowed is not None and change <= allowed,
    }


def targets(measured: dict[str, Any]) -> list[dict[str, Any]]:
    """The soak's verdicts; each says what was compared and whether the target is met."""
    samples = measured["samples"]
    config = measured["config"]
    totals = measured["totals"]
    failures = {
        kind: {"server_errors": t["server_errors"], "timeouts": t["timeouts"]}
        for kind, t in totals.items()
        if t["server_errors"] or t["timeouts"]
    }
    failed = sum(f["server_errors"] + f["timeouts"] for f in failures.values())
    reference = next((s for s in samples if s["t_s"] >= config["warmup_s"] - 1e-6), None)
    last = samples[-1] if samples else None
    growth = None
    if reference and last and reference["rss_mb"]:
        growth = round((last["rss_mb"] - reference["rss_mb"]) / reference["rss_mb"] * 100, 2)
    windows = measured["p99_windows"]
    ratios = {k: w["ratio"] for k, w in windows.items() if w["ratio"] is not None}
    worst = max(ratios.values()) if ratios else None
    return [
        {
            "name": "no_server_errors",
            "description": "0 server errors (5xx, gRPC INTERNAL/UNKNOWN/UNAVAILABLE/DATA_LOSS/"
            "CANCELLED, broken connections, wrong replies) and 0 requests unanswered in time",
            "value": failed,
            "threshold": 0,
            "by_kind": failures,
            "met": failed == 0,
        },
        {
            "name": "rss_growth",
            "description": f"server RSS growth < {MAX_RSS_GROWTH_PCT:g}% from the sample at "
            f"{config['warmup_s']:g} s to the last",
            "value": growth,
            "threshold": MAX_RSS_GROWTH_PCT,
            "reference_mb": reference["rss_mb"] if reference else None,
            "last_mb": last["rss_mb"] if last else None,
            "met": growth is not None and growth < MAX_RSS_GROWTH_PCT,
        },
        _flat(
            samples,
            "fds_net",
            config["warmup_s"],
            "fds_flat",
            "open descriptors less the soak's own connections to the server",
        ),
        _flat(samples, "threads", config["warmup_s"], "threads_flat", "threads"),
        {
            "name": "p99_stable",
            "description": f"per kind, p99 of the last {config['window_s']:g} s within "
            f"{MAX_P99_RATIO - 1:.0%} of the first {config['window_s']:g} s (kinds with "
            f"< {MIN_LATENCIES} answers in a window are not compared)",
            "value": worst,
            "threshold": MAX_P99_RATIO,
            "ratios": ratios,
            "met": worst is not None and worst <= MAX_P99_RATIO,
        },
    ]


def build_document(measured: dict[str, Any], *, now_iso: str, quick: bool) -> dict[str, Any]:
    return {
        "suite": SUITE,
        "timestamp": now_iso,
        "quick": quick,
        "machine": machine_info(),
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "versions": package_versions(
            ["agentd", "grpcio", "h11", "onnxruntime", "wasmtime", "pyvoy", "matplotlib"]
        ),
        "method": {
            "server": "agentd serve on 127.0.0.1 with the built-in models, agents and tools, "
            "defaults (no AGENTD_* variables), a temporary working directory",
            "load": "generator processes of their own (grpcio aio stubs; HTTP/1.1 keep-alive "
            "connections over h11, agentd_bench.soak_http); a "
            "closed-loop ramp finds the mix's capacity (answered req/s, best level), then "
            "open-loop arrivals at load_fraction of it, each kind drawn by weight (mix)",
            "kinds": {
                "grpc_unary": "AgentService/Invoke, echo agent, gRPC",
                "grpc_stream": "AgentService/InvokeStream, echo agent, gRPC",
                "json_unary": "AgentService/Invoke, Connect JSON",
                "json_stream": "AgentService/InvokeStream, Connect JSON streaming",
                "kserve_rest": "POST /v2/models/decision/infer, JSON, one row",
                "kserve_grpc": "GRPCInferenceService/ModelInfer, raw_input_contents",
                "openai_stream": "POST /v1/chat/completions stream=true, tinylm, 24 tokens; "
                "every third left by the client after 2 chunks (counted as cut)",
                "tool_call": "AgentService/CallTool calc/echo/text_stats, gRPC and Connect JSON",
                "tools_list": "GET /v1/tools",
                "swarm": "rounds of N echo agents (the same N each round), 64 at a time, gRPC",
            },
            "sampling": "every interval_s: RSS, open descriptors (/proc/PID/fd) and threads "
            "(/proc/PID/status) summed over the serve process and its children (Envoy runs "
            "the gateway); /healthz latency polled every 0.5 s (event-loop lag seen from "
            "outside); a loop-lag metric from /metrics when the server has one; the server "
            "log's size; per kind, answers and p99 in the window",
            "latency": "request start to last byte (streams: to the end; cut streams not "
            "counted); nearest-rank percentiles",
        },
        "mix": MIX,
        **measured,
        "targets": targets(measured),
    }


def _series(samples: list[dict[str, Any]], path: tuple[str, ...]) -> list[float | None]:
    values: list[float | None] = []
    for sample in samples:
        value: Any = sample
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        values.append(value)
    return values


def plot(document: dict[str, Any], path: Path) -> None:
    """One panel per series, time (minutes) on x; the warm-up end as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = document["samples"]
    minutes = [s["t_s"] / 60 for s in samples]
    traffic = samples[1:]  # sample 0 is taken before any traffic
    traffic_x = minutes[1:]
    panels: list[tuple[str, list[tuple[str, list[Any], list[float]]], bool]] = [
        ("server RSS (MB)", [("RSS", _series(samples, ("rss_mb",)), minutes)], False),
        (
            "open descriptors",
            [
                ("all", _series(samples, ("fds",)), minutes),
                ("less the soak's connections", _series(traffic, ("fds_net",)), traffic_x),
            ],
            False,
        ),
        ("threads", [("threads", _series(samples, ("threads",)), minutes)], False),
        (
            "CPU (% of one core)",
            [
                ("server", _series(traffic, ("server_cpu_pct",)), traffic_x),
                ("load generators", _series(traffic, ("generator_cpu_pct",)), traffic_x),
            ],
            False,
        ),
        (
            "/healthz latency (ms)",
            [
                ("p50", _series(traffic, ("healthz_ms", "p50")), traffic_x),
                ("max", _series(traffic, ("healthz_ms", "max")), traffic_x),
                ("loop lag metric", _series(traffic, ("loop_lag_metric_ms",)), traffic_x),
            ],
            False,
        ),
        (
            "p99 latency by kind (ms)",
            [(k, _series(traffic, ("kinds", k, "p99_ms")), traffic_x) for k in KINDS],
            True,
        ),
        (
            "answered req/s by kind",
            [
                ("total", _series(traffic, ("requests_per_s",)), traffic_x),
                *[(k, _series(traffic, ("kinds", k, "rps")), traffic_x) for k in KINDS],
            ],
            False,
        ),
        (
            "requests per window",
            [
                ("server errors", _series(traffic, ("server_errors",)), traffic_x),
                ("timeouts", _series(traffic, ("timeouts",)), traffic_x),
                ("rejected", _series(traffic, ("rejected",)), traffic_x),
                ("cut streams", _series(traffic, ("cut",)), traffic_x),
            ],
            False,
        ),
        ("server log (MB)", [("log", _series(samples, ("log_mb",)), minutes)], False),
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 2.3 * len(panels)), sharex=True)
    warmup_min = document["config"]["warmup_s"] / 60
    colours = list(matplotlib.color_sequences["tab20"])  # 11 lines by kind: tab10 repeats
    for ax, (title, lines, log_y) in zip(axes, panels, strict=True):
        ax.set_prop_cycle(color=colours[::2] + colours[1::2])
        for label, values, xs in lines:
            points = [(x, v) for x, v in zip(xs, values, strict=True) if v is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker=".", linewidth=1, label=label)
        ax.set_title(title, fontsize=9, loc="left")
        ax.axvline(warmup_min, color="grey", linestyle="--", linewidth=0.8)
        ax.grid(True, alpha=0.3)
        if log_y and ax.has_data():
            ax.set_yscale("log")
        else:
            ax.ticklabel_format(axis="y", style="plain", useOffset=False)
        if len(lines) > 1 and ax.has_data():
            ax.legend(fontsize=7, ncol=4, loc="upper left")
    axes[-1].set_xlabel("minutes")
    fig.suptitle(
        f"agentd soak {document['timestamp']}: {document['config']['minutes']:g} min at "
        f"{document['capacity']['target_rps']:g} req/s "
        f"({document['config']['load_fraction']:.0%} of {document['capacity']['rps']:g})",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.985))  # room for the title
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def render(document: dict[str, Any], console: Console) -> None:
    config, capacity = document["config"], document["capacity"]
    table = Table(
        title=f"soak: {config['minutes']:g} min at {capacity['target_rps']:g} req/s "
        f"({config['load_fraction']:.0%} of the measured {capacity['rps']:g} req/s)",
        box=box.SIMPLE_HEAD,
        show_edge=False,
    )
    headers = ("kind", "sent", "ok", "cut", "failed", "shed", "p99 ms\nfirst", "p99 ms\nlast")
    for column in (*headers, "ratio"):
        table.add_column(column, justify="left" if column == "kind" else "right")
    windows = document["p99_windows"]
    for kind in KINDS:
        t, w = document["totals"][kind], windows[kind]
        table.add_row(
            kind,
            f"{t['sent']:,}",
            f"{t['ok']:,}",
            f"{t['cut']:,}",
            f"{t['server_errors'] + t['timeouts']:,}",
            f"{t['rejected'] + t['not_sent']:,}",
            _ms(w["first_p99_ms"]),
            _ms(w["last_p99_ms"]),
            "-" if w["ratio"] is None else f"{w['ratio']:.2f}",
        )
    console.print(table)
    console.print(
        "failed: server errors + timeouts; shed: rejected (429/RESOURCE_EXHAUSTED) + not sent "
        "(generator at its in-flight bound)"
    )
    first, last = document["samples"][0], document["samples"][-1]
    console.print(
        f"server: RSS {first['rss_mb']:.0f} -> {last['rss_mb']:.0f} MB, descriptors "
        f"{first['fds']} -> {last['fds']}, threads {first['threads']} -> {last['threads']}, "
        f"log {document['server']['log_bytes'] / 1e6:.1f} MB "
        f"({document['server']['tracebacks']} tracebacks)"
    )
    for target in document["targets"]:
        verdict = "met" if target["met"] else "NOT met"
        console.print(
            f"{target['name']}: {target['value']} -> {verdict}  ({target['description']})"
        )
    if document.get("plot"):
        console.print(f"plot: {document['plot']}", soft_wrap=True)
