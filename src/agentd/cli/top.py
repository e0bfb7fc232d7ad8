"""``agentd top``: a live view of a running node, read from its ``/metrics`` every second.

The model is plain functions, testable without a terminal: ``parse_metrics`` reads the
Prometheus text (or OpenMetrics) exposition, ``build_frame`` turns two scrapes and the seconds
between them into a ``Frame`` (rates, histogram means and quantiles over that interval, like
PromQL's ``rate`` and ``histogram_quantile``). ``render`` turns a Frame into rich renderables.
A metric the node does not export (an older node, a feature it lacks) shows as "-": the view
never fails on what it cannot find.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    import httpx
    from rich.console import Console, RenderableType

__all__ = ["METRICS", "Frame", "ModelRow", "build_frame", "parse_metrics", "render", "top"]

# The metrics top reads, by role: the names agentd.observability exports (counters with the
# `_total` the exposition adds, histograms by their base name). A role lists the current name
# first and older names after it, so top reads nodes from before and after a rename; a rename
# is one edit here.
METRICS: dict[str, tuple[str, ...]] = {
    "agents_active": ("agentd_agents_active",),  # gauge
    "agents_passivated": ("agentd_agents_passivated_total",),
    "turns": ("agentd_agent_turns_total",),  # {agent_type, outcome}
    "run_queue": ("agentd_pool_queue_depth",),  # gauge: agents waiting for a worker
    "busy_workers": ("agentd_pool_busy_workers",),  # gauge
    "rejections": ("agentd_pool_rejections_total",),  # messages refused: queue full
    "batch_size": ("agentd_inference_batch_size",),  # histogram {model}
    "infer_requests": ("agentd_inference_requests_total",),  # {model}
    "tokens": ("agentd_lm_tokens_generated_total",),  # {model}
    "ttft": ("agentd_lm_time_to_first_token_seconds",),  # histogram {model}
    "kv_used": ("agentd_lm_kv_blocks_used",),  # gauge {model}
    "kv_free": ("agentd_lm_kv_blocks_free",),  # gauge {model}
    "tool_calls": ("agentd_tool_calls_total",),  # {tool, outcome}
    "tool_failures": ("agentd_tool_errors_total",),  # {tool, kind}
    "errors": ("agentd_request_errors_total",),  # {protocol, method, code}
    "gc_pause": ("agentd_gc_pause_seconds",),  # histogram {generation} (issue 16)
    "loop_lag": ("agentd_event_loop_lag_seconds",),  # histogram (issue 16)
}

Labels = tuple[tuple[str, str], ...]
Samples = dict[str, dict[Labels, float]]

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_ESCAPE = re.compile(r"\\(.)")


def parse_metrics(text: str) -> Samples:
    """Every sample of an exposition: {sample name: {sorted label pairs: value}}.

    Comments, exemplars and timestamps are dropped; a line that is not a sample is skipped
    (a view of someone else's node must not fail on one odd line).
    """
    samples: Samples = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("#"):
            # A family declared with no samples yet (a labelled counter before its first
            # increment) reads as zero, not as a metric the node lacks.
            fields = line.split()
            if len(fields) >= 4 and fields[1] == "TYPE":
                for name in _sample_names(fields[2], fields[3]):
                    samples.setdefault(name, {})
            continue
        if not line:
            continue
        parsed = _parse_sample(line)
        if parsed is not None:
            name, labels, value = parsed
            samples.setdefault(name, {})[labels] = value
    return samples


def _parse_sample(line: str) -> tuple[str, Labels, float] | None:
    match = _NAME.match(line)
    if match is None:
        return None
    rest = line[match.end() :]
    pairs: list[tuple[str, str]] = []
    if rest.startswith("{"):
        pos = 1
        while (label := _LABEL.match(rest, pos)) is not None:
            pairs.append((label.group(1), _unescape(label.group(2))))
            pos = label.end()
        rest = rest[pos:].lstrip()
        if not rest.startswith("}"):
            return None
        rest = rest[1:]
    # value [timestamp] [# exemplar]
    fields = rest.split("#", 1)[0].split()
    if not fields:
        return None
    try:
        value = float(fields[0])
    except ValueError:
        return None
    return match.group(), tuple(sorted(pairs)), value


def _sample_names(family: str, kind: str) -> tuple[str, ...]:
    if kind == "counter":
        # Classic text declares counters by their sample name, OpenMetrics without `_total`.
        return (family if family.endswith("_total") else family + "_total",)
    if kind == "histogram":
        return (family + "_bucket", family + "_sum", family + "_count")
    return (family,)


def _unescape(value: str) -> str:
    return _ESCAPE.sub(lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def _series(samples: Samples, role: str, suffix: str = "") -> dict[Labels, float] | None:
    for name in METRICS[role]:
        found = samples.get(name + suffix)
        if found is not None:
            return found
    return None


def _by(series: dict[Labels, float], label: str | None) -> dict[str, float]:
    """Sum the samples grouped by one label's value ("" for all of them)."""
    out: dict[str, float] = {}
    for labels, value in series.items():
        key = dict(labels).get(label, "") if label else ""
        out[key] = out.get(key, 0.0) + value
    return out


def _values(samples: Samples, role: str, label: str | None = None) -> dict[str, float] | None:
    series = _series(samples, role)
    return None if series is None else _by(series, label)


def _increase(now: float, before: float | None) -> float:
    # A counter that went down was reset (the node restarted): it counted `now` since then.
    if before is None or now < before:
        return now
    return now - before


def _rates(
    prev: Samples | None, cur: Samples, role: str, seconds: float, label: str | None = None
) -> dict[str, float] | None:
    now = _values(cur, role, label)
    if now is None or prev is None or seconds <= 0:
        return None
    before = _values(prev, role, label) or {}
    return {key: _increase(value, before.get(key)) / seconds for key, value in now.items()}


@dataclass(frozen=True)
class Histogram:
    """A histogram's increase over an interval: cumulative (upper bound, count) pairs."""

    buckets: list[tuple[float, float]]
    sum: float
    count: float

    def mean(self) -> float | None:
        return self.sum / self.count if self.count > 0 else None

    def quantile(self, q: float) -> float | None:
        """PromQL's ``histogram_quantile``: linear within the bucket that holds rank q."""
        if self.count <= 0 or not self.buckets or not math.isinf(self.buckets[-1][0]):
            return None
        rank = q * self.buckets[-1][1]
        lower, below = 0.0, 0.0
        for upper, cumulative in self.buckets:
            if cumulative >= rank:
                if math.isinf(upper):
                    # Past the last finite bound: that bound is all we know.
                    return lower if len(self.buckets) > 1 else None
                if cumulative == below:
                    return upper
                return lower + (upper - lower) * (rank - below) / (cumulative - below)
            lower, below = upper, cumulative
        return None


def _histograms(
    prev: Samples | None, cur: Samples, role: str, label: str | None
) -> dict[str, Histogram] | None:
    buckets = _series(cur, role, "_bucket")
    if buckets is None or prev is None:
        return None
    before = _series(prev, role, "_bucket") or {}
    grouped: dict[str, dict[float, float]] = {}
    for labels, value in buckets.items():
        named = dict(labels)
        try:
            upper = float(named.pop("le"))
        except (KeyError, ValueError):
            continue
        key = named.get(label, "") if label else ""
        increase = _increase(value, before.get(labels))
        bounds = grouped.setdefault(key, {})
        bounds[upper] = bounds.get(upper, 0.0) + increase
    sums = _by_increase(prev, cur, role, "_sum", label)
    counts = _by_increase(prev, cur, role, "_count", label)
    return {
        key: Histogram(sorted(bounds.items()), sums.get(key, 0.0), counts.get(key, 0.0))
        for key, bounds in grouped.items()
    }


def _by_increase(
    prev: Samples, cur: Samples, role: str, suffix: str, label: str | None
) -> dict[str, float]:
    now = _series(cur, role, suffix) or {}
    before = _series(prev, role, suffix) or {}
    increases = {labels: _increase(value, before.get(labels)) for labels, value in now.items()}
    return _by(increases, label)


@dataclass(frozen=True)
class ModelRow:
    """One model's line; None where the node exports nothing for it (shown as "-")."""

    model: str
    batch_mean: float | None  # rows per executor run over the interval
    infer_rate: float | None  # inference requests/s
    tokens_rate: float | None  # generated tokens/s
    ttft_p50: float | None  # seconds
    ttft_p99: float | None
    kv_used: float | None  # KV-cache blocks lent now
    kv_total: float | None  # used + free


@dataclass(frozen=True)
class Frame:
    """What one refresh shows. Rates are per second over ``seconds``; None means "-"."""

    url: str
    seconds: float | None  # between the two scrapes; None on the first one
    agents_active: float | None
    agents_passivated: float | None
    turns_rate: float | None
    run_queue: float | None
    busy_workers: float | None
    rejections: float | None
    rejections_rate: float | None
    tool_calls_rate: float | None
    tool_failures_rate: float | None
    tool_calls: float | None
    tool_failures: float | None
    gc_pause_p99: float | None
    loop_lag_p99: float | None
    models: list[ModelRow]
    errors: list[tuple[str, float, float | None]]  # (code, total, per second)


def _one(values: dict[str, float] | None) -> float | None:
    return None if values is None else sum(values.values())


def build_frame(prev: Samples | None, cur: Samples, seconds: float | None, url: str) -> Frame:
    """The frame of scrape ``cur``, with rates over the ``seconds`` since ``prev`` (no rates
    without a ``prev``)."""
    span = seconds or 0.0
    prev = prev if seconds else None
    tool_calls = _rates(prev, cur, "tool_calls", span)
    tool_failures = _rates(prev, cur, "tool_failures", span)
    gc = (_histograms(prev, cur, "gc_pause", None) or {}).get("")
    lag = (_histograms(prev, cur, "loop_lag", None) or {}).get("")
    error_totals = _values(cur, "errors", "code") or {}
    error_rates = _rates(prev, cur, "errors", span, "code") or {}
    return Frame(
        url=url,
        seconds=seconds,
        agents_active=_one(_values(cur, "agents_active")),
        agents_passivated=_one(_values(cur, "agents_passivated")),
        turns_rate=_one(_rates(prev, cur, "turns", span)),
        run_queue=_one(_values(cur, "run_queue")),
        busy_workers=_one(_values(cur, "busy_workers")),
        rejections=_one(_values(cur, "rejections")),
        rejections_rate=_one(_rates(prev, cur, "rejections", span)),
        tool_calls_rate=_one(tool_calls),
        tool_failures_rate=_one(tool_failures),
        tool_calls=_one(_values(cur, "tool_calls")),
        tool_failures=_one(_values(cur, "tool_failures")),
        gc_pause_p99=gc.quantile(0.99) if gc is not None else None,
        loop_lag_p99=lag.quantile(0.99) if lag is not None else None,
        models=_model_rows(prev, cur, span),
        errors=[
            (code, total, error_rates.get(code)) for code, total in sorted(error_totals.items())
        ],
    )


def _model_rows(prev: Samples | None, cur: Samples, seconds: float) -> list[ModelRow]:
    batches = _histograms(prev, cur, "batch_size", "model") or {}
    ttft = _histograms(prev, cur, "ttft", "model") or {}
    infer = _rates(prev, cur, "infer_requests", seconds, "model") or {}
    tokens = _rates(prev, cur, "tokens", seconds, "model") or {}
    used = _values(cur, "kv_used", "model") or {}
    free = _values(cur, "kv_free", "model") or {}
    models: set[str] = set()
    for role in ("infer_requests", "tokens", "kv_used"):
        models.update(_values(cur, role, "model") or {})
    for role in ("batch_size", "ttft"):
        models.update(_by(_series(cur, role, "_count") or {}, "model"))
    models.discard("")
    rows = []
    for model in sorted(models):
        batch, first = batches.get(model), ttft.get(model)
        kv_total = used[model] + free[model] if model in used and model in free else None
        rows.append(
            ModelRow(
                model=model,
                batch_mean=batch.mean() if batch is not None else None,
                infer_rate=infer.get(model),
                tokens_rate=tokens.get(model),
                ttft_p50=first.quantile(0.5) if first is not None else None,
                ttft_p99=first.quantile(0.99) if first is not None else None,
                kv_used=used.get(model),
                kv_total=kv_total,
            )
        )
    return rows


# --- the view -------------------------------------------------------------------------------

MISSING = "-"


def count_text(value: float | None) -> str:
    return MISSING if value is None else f"{value:.0f}"


def rate_text(value: float | None) -> str:
    return MISSING if value is None else f"{value:.1f}"


def seconds_text(value: float | None) -> str:
    if value is None:
        return MISSING
    if value < 1.0:
        return f"{value * 1000:.1f} ms"
    return f"{value:.2f} s"


def render(frame: Frame, *, problem: str | None = None) -> RenderableType:
    """The frame as rich renderables: a title, the node's numbers, a table per model and
    one per error code. ``problem`` (a failed scrape) is shown above the last frame."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    every = f"rates over {frame.seconds:.1f} s" if frame.seconds else "first scrape, no rates yet"
    title = Text.assemble(("agentd top", "bold"), f"  {frame.url}  {every}  ")
    title.append(time.strftime("%H:%M:%S"))
    parts: list[RenderableType] = [title]
    if problem is not None:
        parts.append(Text(f"scrape failed: {problem}", style="bold red"))

    node = Table.grid(padding=(0, 2))
    for _ in range(3):
        node.add_column()
        node.add_column(justify="right")
    node.add_row(
        "agents active", count_text(frame.agents_active),
        "turns/s", rate_text(frame.turns_rate),
        "tool calls/s", rate_text(frame.tool_calls_rate),
    )  # fmt: skip
    node.add_row(
        "passivated", count_text(frame.agents_passivated),
        "run queue", count_text(frame.run_queue),
        "tool failures/s", rate_text(frame.tool_failures_rate),
    )  # fmt: skip
    node.add_row(
        "rejections", count_text(frame.rejections),
        "busy workers", count_text(frame.busy_workers),
        "tool calls", count_text(frame.tool_calls),
    )  # fmt: skip
    node.add_row(
        "rejections/s", rate_text(frame.rejections_rate),
        "GC pause p99", seconds_text(frame.gc_pause_p99),
        "tool failures", count_text(frame.tool_failures),
    )  # fmt: skip
    node.add_row("", "", "loop lag p99", seconds_text(frame.loop_lag_p99), "", "")
    parts.append(node)

    models = Table(box=None, pad_edge=False, header_style="bold")
    for header in ("MODEL", "BATCH", "INFER/S", "TOKENS/S", "TTFT P50", "TTFT P99", "KV BLOCKS"):
        models.add_column(header, justify="left" if header == "MODEL" else "right")
    for row in frame.models:
        kv = count_text(row.kv_used)
        if row.kv_used is not None and row.kv_total is not None:
            kv = f"{row.kv_used:.0f}/{row.kv_total:.0f}"
        models.add_row(
            row.model,
            MISSING if row.batch_mean is None else f"{row.batch_mean:.1f}",
            rate_text(row.infer_rate),
            rate_text(row.tokens_rate),
            seconds_text(row.ttft_p50),
            seconds_text(row.ttft_p99),
            kv,
        )
    if not frame.models:
        models.add_row("(none)", *[MISSING] * 6)
    parts.append(models)

    errors = Table(box=None, pad_edge=False, header_style="bold")
    errors.add_column("ERROR CODE")
    errors.add_column("TOTAL", justify="right")
    errors.add_column("/S", justify="right")
    for code, total, per_second in frame.errors:
        errors.add_row(code or MISSING, count_text(total), rate_text(per_second))
    if not frame.errors:
        errors.add_row("(none)", MISSING, MISSING)
    parts.append(errors)
    return Group(*parts)


# --- the command ----------------------------------------------------------------------------


class ScrapeError(Exception):
    """A scrape that got no agentd metrics; its message is one line for the operator."""


def scrape(client: httpx.Client, url: str) -> Samples:
    """GET ``url``/metrics and parse it; ScrapeError when unreachable or not an agentd node."""
    import httpx

    try:
        # Classic text: OpenMetrics adds nothing top shows (exemplars are skipped anyway).
        response = client.get(f"{url}/metrics", headers={"accept": "text/plain; version=0.0.4"})
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise ScrapeError(f"cannot reach {url}: {exc or type(exc).__name__}") from None
    if response.status_code != 200:
        text = " ".join(response.text[:200].split())
        raise ScrapeError(f"{url}/metrics answered HTTP {response.status_code}: {text}")
    samples = parse_metrics(response.text)
    if not any(name.startswith("agentd_") for name in samples):
        raise ScrapeError(f"{url}/metrics has no agentd metrics (is it an agentd node?)")
    return samples


def top(
    url: Annotated[str, typer.Option(help="Gateway URL.")] = "http://127.0.0.1:8080",
    token: Annotated[str | None, typer.Option(help="Bearer token \\[env: AGENTD_TOKEN].")] = None,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes (0.1 to 3600).")] = 1.0,
    once: Annotated[
        bool, typer.Option("--once", help="Print one frame (two scrapes INTERVAL apart), exit.")
    ] = False,
) -> None:
    """A live view of a running node, from its /metrics: agents, turns/s, run queue,
    rejections, batch sizes, tokens/s and time to first token per model, KV blocks, tool
    calls and failures, errors by code, GC pause and event-loop lag p99. Ctrl-C quits."""
    import httpx
    from rich.console import Console

    from agentd.cli.tools import _client_headers as client_headers

    if not (math.isfinite(interval) and 0.1 <= interval <= 3600):
        typer.echo("error: --interval must be a number of seconds from 0.1 to 3600", err=True)
        raise typer.Exit(2)
    url = url.rstrip("/")
    console = Console()
    try:
        with httpx.Client(headers=client_headers(token), timeout=max(5.0, interval)) as client:
            try:
                first = scrape(client, url)
            except ScrapeError as exc:
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(1) from None
            if once:
                _once(client, url, first, interval, console)
            else:
                _live(client, url, first, interval, console)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how one leaves top: exit 0, the last frame left on screen


def _once(
    client: httpx.Client, url: str, first: Samples, interval: float, console: Console
) -> None:
    started = time.monotonic()
    time.sleep(interval)
    try:
        second = scrape(client, url)
    except ScrapeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    console.print(render(build_frame(first, second, time.monotonic() - started, url)))


def _live(
    client: httpx.Client, url: str, first: Samples, interval: float, console: Console
) -> None:
    from rich.live import Live

    prev, prev_at = first, time.monotonic()
    frame = build_frame(None, first, None, url)
    next_at = prev_at + interval
    with Live(render(frame), console=console, auto_refresh=False) as live:
        live.refresh()
        while True:
            time.sleep(max(0.0, next_at - time.monotonic()))
            next_at = max(next_at + interval, time.monotonic())
            try:
                cur = scrape(client, url)
            except ScrapeError as exc:
                # Keep the last frame and keep trying: a node that restarts comes back.
                live.update(render(frame, problem=str(exc)), refresh=True)
                continue
            now = time.monotonic()
            frame = build_frame(prev, cur, now - prev_at, url)
            live.update(render(frame), refresh=True)
            prev, prev_at = cur, now
