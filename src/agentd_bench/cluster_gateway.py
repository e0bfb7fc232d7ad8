"""The gateway section of ``agentd bench cluster``: unary gRPC ``Invoke`` at 64 in flight
against ``agentd serve --processes 2`` and ``--processes 1``, in alternating rounds.

Two calls are measured on each server:

* ``echo``: stateless, so it runs in the process the connection reached (nothing crosses
  between processes); the figure the target is about;
* ``counter``: a stateful agent (a plugin written here) at 8 addresses, half owned by each
  process; 8 h2load clients (one per address, 8 in flight each) whose connections the
  kernel spreads over the processes, so about half the calls are forwarded to their owner.
  Reported, no target.

CPU per request is the server's process tree's utime + stime over the measured window
(/proc), divided by the requests completed in it.
"""

from __future__ import annotations

import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx

from agentd.agents.address import Address
from agentd.cluster.placement import Placement
from agentd.settings import Settings
from agentd.v1 import agent_pb2 as pb
from agentd_bench import echo, h2load
from agentd_bench.cluster_servers import cpu_seconds
from agentd_bench.errors import BenchError
from agentd_bench.servers import ServerError, ServerProcess, agentd_env, free_port

__all__ = ["COUNTER_PLUGIN", "GatewayConfig", "measure_gateway"]

CONCURRENCY = 64
COUNTER_ADDRESSES = 8
COUNTER_DIGITS = 12

# A stateful agent: every reply has the same length, so good replies are counted from the
# bytes h2load received (gRPC errors come as HTTP 200 with no message).
COUNTER_PLUGIN = f'''"""The stateful agent of agentd bench cluster."""

from agentd import Agent


class BenchCounter(Agent):
    name = "counter"
    description = "Counts the calls this instance has had (its state)."

    async def handle(self, ctx, message):
        seen = ctx.state.get("seen", 0) + 1
        ctx.state["seen"] = seen
        return f"{{seen:0{COUNTER_DIGITS}d}}"
'''


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    rounds: int
    duration_s: float
    warmup_s: float


def counter_ids(processes: int = 2, count: int = COUNTER_ADDRESSES) -> list[str]:
    """``count`` instance ids of the counter, the same number owned by each of the
    ``processes`` local processes (their static placement: p0, p1, ...)."""
    placement = Placement.spread([f"p{i}" for i in range(processes)], Settings().partitions)
    per_owner = count // processes
    found: dict[str, list[str]] = {}
    for i in range(10_000):
        key = f"k{i:04d}"
        owned = found.setdefault(placement.owner(Address("counter", key)), [])
        if len(owned) < per_owner:
            owned.append(key)
        if sum(map(len, found.values())) == count:
            return [key for keys in found.values() for key in keys]
    raise BenchError("no spread of counter ids found")  # pragma: no cover


def _counter_body(key: str) -> bytes:
    request = pb.InvokeRequest(agent=f"counter/{key}", message=pb.Message(text="x"))
    return echo.grpc_frame(request.SerializeToString())


def _counter_reply_len(key: str) -> int:
    reply = pb.InvokeResponse(agent=f"counter/{key}", message=pb.Message(text="0" * COUNTER_DIGITS))
    return len(echo.grpc_frame(reply.SerializeToString()))


def _url(port: int) -> str:
    return f"http://127.0.0.1:{port}{echo.INVOKE_PATH}"


@contextmanager
def _serving(processes: int, workdir: Path, plugins: Path) -> Iterator[ServerProcess]:
    port = free_port()
    argv = [sys.executable, "-m", "agentd", "serve", "--port", str(port)]
    argv += ["--processes", str(processes), "--plugins", str(plugins)]
    log = workdir / f"serve-{processes}-{port}.log"
    env = {**agentd_env(), "AGENTD_STATE_PATH": str(workdir / f"state-{port}.db")}
    with ServerProcess(f"agentd serve --processes {processes}", argv, port, log, env=env) as server:
        try:
            server.wait_listening(timeout=90)
            if processes > 1:  # the supervisor names its processes once all serve
                deadline = time.monotonic() + 60
                while "processes: " not in log.read_text(errors="replace"):
                    server.check_alive()
                    if time.monotonic() > deadline:
                        raise BenchError(f"not every process of {server.name} started")
                    time.sleep(0.05)
            echo.verify_grpc(port)
        except ServerError as exc:
            raise BenchError(f"{exc}: {log.read_text(errors='replace')[-1500:]}") from exc
        yield server


def _load(
    specs: list[h2load.LoadSpec], reply_lens: list[int], binary: str, pid: int
) -> dict[str, Any]:
    """Warm up, then run every spec at once (one h2load each); throughput, latency, errors
    and the server's CPU per request over the measured window."""
    with ThreadPoolExecutor(len(specs)) as pool:
        warm = [replace(s, duration_s=max(0.2, s.duration_s / 5)) for s in specs]
        list(pool.map(lambda s: h2load.run_load(s, binary), warm))
        cpu_before, started = cpu_seconds(pid), time.perf_counter()
        results = list(pool.map(lambda s: h2load.run_load(s, binary), specs))
        cpu = cpu_seconds(pid) - cpu_before
        elapsed = time.perf_counter() - started
    requests = sum(r.requests for r in results)
    errors = 0
    for result, reply_len in zip(results, reply_lens, strict=True):
        good = result.data_bytes // reply_len
        errors += result.errors + max(0, result.status["2xx"] - good)
    latencies = sorted(t for r in results for t in r.latencies_us)
    return {
        "requests": requests,
        "rps": round(sum(r.rps for r in results), 1),
        "p50_ms": round(h2load.percentile(latencies, 50) / 1000, 3) if latencies else None,
        "p99_ms": round(h2load.percentile(latencies, 99) / 1000, 3) if latencies else None,
        "errors": errors,
        "cpu_s": round(cpu, 3),
        "cpu_us_per_request": round(1e6 * cpu / requests, 1) if requests else None,
        "window_s": round(elapsed, 2),
    }


_FORWARDED = re.compile(
    r'^agentd_cluster_forwarded_seconds_count\{kind="ask",outcome="ok"\} ([0-9.e+]+)$', re.M
)
_NODE = re.compile(r'^agentd_cluster_node\{node="([^"]+)"\} 1\.0$', re.M)


def _forwarded_asks(port: int, processes: int) -> int | None:
    """Forwarded asks summed over the processes: /metrics on fresh connections until each
    process has answered once (None if one never did)."""
    counts: dict[str, int] = {}
    for _ in range(40 * processes):
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        node = _NODE.search(text)
        if node is None:
            return None
        match = _FORWARDED.search(text)
        counts[node[1]] = int(float(match[1])) if match else 0
        if len(counts) == processes:
            return sum(counts.values())
    return None


def _one_round(
    processes: int, config: GatewayConfig, binary: str, workdir: Path, plugins: Path
) -> dict[str, Any]:
    with _serving(processes, workdir, plugins) as server:
        assert server.pid is not None
        echo_spec = h2load.LoadSpec(
            url=_url(server.port),
            body=echo.grpc_request_body(),
            headers=echo.GRPC_HEADERS,
            concurrency=CONCURRENCY,
            duration_s=config.duration_s,
        )
        measured = {"echo": _load([echo_spec], [echo.grpc_reply_frame_len()], binary, server.pid)}
        keys = counter_ids()
        specs = [
            replace(echo_spec, body=_counter_body(k), concurrency=CONCURRENCY // len(keys))
            for k in keys
        ]
        stateful = _load(specs, [_counter_reply_len(k) for k in keys], binary, server.pid)
        forwarded = _forwarded_asks(server.port, processes) if processes > 1 else 0
        # Every call (warm-up and stragglers included) was one turn of one counter: the
        # next turn's count says how many there were.
        turns = 0
        for key in keys:
            reply = httpx.post(
                f"http://127.0.0.1:{server.port}{echo.INVOKE_PATH}",
                json={"agent": f"counter/{key}", "message": {"text": "x"}},
                timeout=10,
            )
            turns += int(reply.json()["message"]["text"]) - 1
        stateful["calls_total"] = turns
        stateful["forwarded_total"] = forwarded
        stateful["forwarded_share"] = (
            round(forwarded / turns, 3) if forwarded is not None and turns else None
        )
        measured["counter"] = stateful
    return measured


def _summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the rounds of one server and call."""

    def median(key: str) -> float | None:
        values = [r[key] for r in rounds if r[key] is not None]
        return round(statistics.median(values), 3) if values else None

    return {
        "rps": median("rps"),
        "p99_ms": median("p99_ms"),
        "p50_ms": median("p50_ms"),
        "cpu_us_per_request": median("cpu_us_per_request"),
        "errors": sum(r["errors"] for r in rounds),
        "rounds": rounds,
    }


def measure_gateway(
    config: GatewayConfig, workdir: Path, progress: Callable[[str], None]
) -> dict[str, Any]:
    """Alternating rounds (1 then 2 processes, then 2 then 1, ...) of both calls; the
    medians per server and call, and the ratio of 2 processes over 1."""
    try:
        binary = h2load.find_h2load()
    except h2load.H2LoadError as exc:
        from agentd_bench.cluster_servers import Skipped

        raise Skipped(str(exc)) from None
    plugins = workdir / "plugins"
    (plugins / "agents").mkdir(parents=True, exist_ok=True)
    (plugins / "agents" / "bench_counter.py").write_text(COUNTER_PLUGIN)
    rounds: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    for index in range(config.rounds):
        for processes in (1, 2) if index % 2 == 0 else (2, 1):
            measured = _one_round(processes, config, binary, workdir, plugins)
            rounds[processes].append(measured)
            e, c = measured["echo"], measured["counter"]
            progress(
                f"gateway round {index + 1}, --processes {processes}: echo {e['rps']:,.0f} req/s"
                f" p99 {e['p99_ms']} ms {e['cpu_us_per_request']} µs CPU/req; counter"
                f" {c['rps']:,.0f} req/s p99 {c['p99_ms']} ms, forwarded {c['forwarded_share']}"
            )
    result: dict[str, Any] = {"concurrency": CONCURRENCY, "duration_s": config.duration_s}
    for call in ("echo", "counter"):
        one = _summary([r[call] for r in rounds[1]])
        two = _summary([r[call] for r in rounds[2]])
        ratio = round(two["rps"] / one["rps"], 3) if one["rps"] and two["rps"] else None
        result[call] = {"processes_1": one, "processes_2": two, "ratio_rps": ratio}
    result["h2load"] = h2load.h2load_version(binary)
    return result
