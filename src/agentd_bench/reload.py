"""``agentd bench reload``: how fast a plugin written to a running ``agentd serve`` answers,
and what reloading costs in memory (issue 15's benchmark).

Sections, each with its target (met or not), or the reason it could not run here:

* agent: an agent plugin rewritten N times (a complete write: a temporary file renamed over
  it); the time from the completed rename to the first call answered by the new version
  (p50, p99, max; target p99 < 100 ms), on the default ``reload_debounce_ms``;
* agent_signed: the same with ``require_signature`` on, the folder's MANIFEST re-signed
  (ed25519) after each write, timed from the completed signature write: the cost of
  verification;
* memory: the RSS of the server after 10 reload cycles and after 1,000 (target: within
  5%): the ``agentd serve`` process and every process below it, summed (the node, which
  reloads, runs in the Envoy child; the ``agentd serve`` process supervises it); the
  cycles continue the agent section's on its server;
* model: a copy of the built-in decision model in the plugin folder, its config rewritten
  with a new version N times while callers keep calling it: from the completed rename to
  the first answer by the new version (reported), and the calls that failed (target 0);
* tool: a tool file written as version A, then B (each built once: new to the tools
  cache), then A again: the time to the first call answered by A from the cache (target
  < 1 s), the builds' times beside it. Full runs only (two builds of 10-25 s each); the
  components land in the user's tools cache like any build.

Both servers are real ``agentd serve`` processes on 127.0.0.1, each with its own temporary
plugin folder; the calls are Connect JSON over httpx.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from agentd.settings import Settings
from agentd_bench.cluster_servers import Skipped
from agentd_bench.errors import BenchError
from agentd_bench.results import (
    machine_info,
    package_versions,
    render_sections,
    run_and_publish,
)
from agentd_bench.servers import ServerError, ServerProcess, agentd_env, descendants, free_port

__all__ = ["FULL", "QUICK", "ReloadConfig", "run_suite"]

SUITE = "reload"
AGENT_P99_MS = 100.0
MEMORY_GROWTH_PCT = 5.0
INVOKE = "/agentd.v1.AgentService/Invoke"
AGENT_FILE = "agents/ver.py"
INSTANCES = 8  # the calls rotate over these instances: each moves to new versions in turn
NEW_VERSION_TIMEOUT_S = 10.0
MODEL = "decision"  # the built-in model, copied into the plugin folder
MODEL_INFER = f"/v2/models/{MODEL}/infer"
MODEL_REQUEST = {
    "inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 16], "data": [0.5] * 16}]
}
MODEL_CALLERS = 2  # besides the one waiting for the new version
CALL_TOOL = "/agentd.v1.AgentService/CallTool"
TOOL = "reload_bench_version"
TOOL_FILE = """
VERSION = {version!r}


def {name}() -> str:
    \"\"\"The version of this file (agentd bench reload).\"\"\"
    return VERSION
"""
TOOL_BUILD_TIMEOUT_S = 300.0
TOOL_CACHED_S = 1.0

# Each version answers with its name; a module-level table makes a version's module hold
# some memory, so a module kept alive by a reload would show in the RSS.
PLUGIN = """
from agentd import Agent

VERSION = {version!r}
TABLE = [VERSION * 8 for _ in range(200)]


class Ver(Agent):
    name = "ver"

    async def handle(self, ctx, message):
        ctx.state["n"] = ctx.state.get("n", 0) + 1
        return VERSION
"""


@dataclass(frozen=True, slots=True)
class ReloadConfig:
    agent_reloads: int  # timed, on each of the two servers
    memory_early: int  # the cycle after which the first RSS is read
    memory_cycles: int  # reload cycles in all on the unsigned server (the timed ones first)
    model_reloads: int
    tool_builds: bool  # the tool section (two builds of 10-25 s each)


FULL = ReloadConfig(
    agent_reloads=100, memory_early=10, memory_cycles=1000, model_reloads=10, tool_builds=True
)
# Quick: the suite's test of the bench itself (every section runs, nothing is concluded).
QUICK = ReloadConfig(
    agent_reloads=6, memory_early=5, memory_cycles=30, model_reloads=2, tool_builds=False
)


# ---------------------------------------------------------------- servers and writes


class _Plugins:
    """A plugin folder holding one agent file, rewritten as complete writes."""

    def __init__(self, folder: Path, signer: Callable[[bytes], bytes] | None = None) -> None:
        self.folder = folder
        self.path = folder / AGENT_FILE
        self.path.parent.mkdir(parents=True)
        self._signer = signer

    def write(self, version: str) -> float:
        """Write ``version`` (a temporary file renamed over the plugin; with a signer, then
        MANIFEST and MANIFEST.sig, each renamed into place); the seconds the signing took."""
        # A hidden name in the same folder: the rename stays on one file system and the
        # watcher ignores the temporary file.
        tmp = self.path.with_name(f".{self.path.name}.{version}.tmp")
        tmp.write_text(textwrap.dedent(PLUGIN.format(version=version)))
        os.replace(tmp, self.path)
        if self._signer is None:
            return 0.0
        from agentd.plugins.manifest import sign_folder

        started = time.perf_counter()
        sign_folder(self.folder, self._signer)
        return time.perf_counter() - started


@contextmanager
def _serving(name: str, plugins: Path, workdir: Path, env: dict[str, str]) -> Iterator[Any]:
    """``agentd serve`` on a free port with ``plugins``; yields (server, log path)."""
    port = free_port()
    argv = [sys.executable, "-m", "agentd", "serve", "--port", str(port)]
    argv += ["--plugins", str(plugins)]
    log = workdir / f"{name}-{port}.log"
    env = {**agentd_env(), "AGENTD_STATE_PATH": str(workdir / f"{name}.db"), **env}
    with ServerProcess(f"agentd serve ({name})", argv, port, log, env=env, cwd=workdir) as server:
        yield server, log


def _wait_ready(server: ServerProcess, log: Path, http: httpx.Client) -> None:
    """Until the server listens, watches its folder and answers with the first version."""
    try:
        server.wait_listening(timeout=90)
        deadline = time.monotonic() + 30
        while "watching " not in log.read_text(errors="replace"):
            server.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"{server.name} does not watch its plugin folder")
            time.sleep(0.02)
        for i in range(INSTANCES):  # every instance exists before the first reload
            _answer(http, f"ver/i{i}")
    except ServerError as exc:
        raise BenchError(f"{exc}: {log.read_text(errors='replace')[-1500:]}") from exc


def _answer(http: httpx.Client, agent: str) -> str:
    r = http.post(INVOKE, json={"agent": agent, "message": {"text": "x"}})
    if r.status_code != 200:
        raise BenchError(f"{agent}: HTTP {r.status_code}: {r.text[:300]}")
    return r.json()["message"]["text"]


def _cycle(plugins: _Plugins, http: httpx.Client, index: int) -> tuple[float, float, int]:
    """Write version ``index`` and call until it answers: (seconds from the completed write
    to that answer, seconds spent signing, calls made)."""
    version = f"v{index}"
    signing = plugins.write(version)
    written = time.perf_counter()
    agent = f"ver/i{index % INSTANCES}"
    calls = 0
    while True:
        calls += 1
        if _answer(http, agent) == version:
            return time.perf_counter() - written, signing, calls
        if time.perf_counter() - written > NEW_VERSION_TIMEOUT_S:
            raise BenchError(f"version {version} did not answer within {NEW_VERSION_TIMEOUT_S} s")


# ---------------------------------------------------------------- figures


def _quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1), interpolated between the closest ranks."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[round(q * 100) - 1]


def _latency(seconds: list[float]) -> dict[str, Any]:
    ms = [s * 1000 for s in seconds]
    return {
        "p50_ms": round(_quantile(ms, 0.50), 2),
        "p99_ms": round(_quantile(ms, 0.99), 2),
        "max_ms": round(max(ms), 2),
        "mean_ms": round(statistics.fmean(ms), 2),
        "latencies_ms": [round(m, 2) for m in ms],
    }


_SAMPLE = re.compile(r"^(\w+)\{([^}]*)\} (\S+)$", re.M)


def _metric(text: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus text sample's values whose labels include ``labels``."""
    total = 0.0
    for found, label_text, value in _SAMPLE.findall(text):
        if found != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


def _server_reloads(http: httpx.Client, kind: str = "agents") -> dict[str, Any]:
    """What the server counted for ``kind``: its reloads by outcome and its own mean reload
    time (for agents: read, verify, import, constructor check, swap; the part verification
    adds to)."""
    text = http.get("/metrics").text
    count = _metric(text, "agentd_plugin_reload_seconds_count", kind=kind)
    total = _metric(text, "agentd_plugin_reload_seconds_sum", kind=kind)
    outcomes = {
        outcome: int(_metric(text, "agentd_plugin_reloads_total", kind=kind, outcome=outcome))
        for outcome in ("ok", "failed", "refused", "removed")
    }
    return {
        "reloads_ok": outcomes.pop("ok"),
        "reloads_not_ok": sum(outcomes.values()),
        "server_reload_mean_ms": round(total / count * 1000, 3) if count else None,
    }


def _rss_mb(pid: int) -> tuple[float, float]:
    """VmRSS of ``pid`` with every process below it, summed, and of ``pid`` alone, in MB."""

    def vm_rss(each: int) -> float:
        try:
            status = Path(f"/proc/{each}/status").read_text()
        except OSError:
            return 0.0
        found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        return int(found.group(1)) / 1024 if found else 0.0

    own = vm_rss(pid)
    return own + sum(vm_rss(child) for child in descendants(pid)), own


def _growth(early: float, late: float) -> float:
    return round((late - early) / early * 100, 2) if early else math.nan


# ---------------------------------------------------------------- measuring


@dataclass
class _Run:
    """The two servers of a run, their plugin folders and clients, and the RSS readings of
    the unsigned server by cycle (its process tree, its ``agentd serve`` process alone)."""

    config: ReloadConfig
    plugins: dict[str, _Plugins]
    servers: dict[str, ServerProcess]
    clients: dict[str, httpx.Client]
    progress: Callable[[str], None]
    logs: dict[str, Path]
    rss: dict[int, tuple[float, float]] = field(default_factory=dict)


def _measure(config: ReloadConfig, progress: Callable[[str], None]) -> dict[str, Any]:
    from agentd.models.catalog import builtin_models_dir
    from agentd.plugins.signing import generate_keypair, load_signing_key

    measured: dict[str, Any] = {}
    with (
        tempfile.TemporaryDirectory(prefix="agentd-bench-reload-") as scratch,
        ExitStack() as stack,
    ):
        workdir = Path(scratch)
        private, _, public = generate_keypair(workdir)
        plugins = {
            "plain": _Plugins(workdir / "plain"),
            "signed": _Plugins(workdir / "signed", load_signing_key(private).sign),
        }
        for folder in plugins.values():
            folder.write("v0")
        # The model section's copy of the built-in decision model (version 1).
        shutil.copytree(builtin_models_dir() / MODEL, plugins["plain"].folder / "models" / MODEL)
        envs = {
            "plain": {},
            "signed": {"AGENTD_REQUIRE_SIGNATURE": "true", "AGENTD_PLUGIN_TRUSTED_KEYS": public},
        }
        # Both start at once: start-up is most of a quick run's time.
        progress("starting agentd serve (an unsigned and a signed plugin folder) ...")
        started = {
            name: stack.enter_context(_serving(name, plugins[name].folder, workdir, envs[name]))
            for name in plugins
        }
        servers = {name: server for name, (server, _) in started.items()}
        clients = {
            name: stack.enter_context(
                httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=30)
            )
            for name, server in servers.items()
        }
        for name, (server, log) in started.items():
            _wait_ready(server, log, clients[name])
        logs = {name: log for name, (_, log) in started.items()}
        run = _Run(config, plugins, servers, clients, progress, logs)
        for name, section in SECTIONS.items():
            progress(f"== {name}")
            load_before = os.getloadavg()[0]
            try:
                measured[name] = section(run)
                # Other work on the machine shows here (a shared machine's figures vary).
                measured[name]["load_average_1m"] = [
                    round(load_before, 2),
                    round(os.getloadavg()[0], 2),
                ]
            except Skipped as exc:
                measured[name] = {"skipped": str(exc)}
                progress(f"{name}: skipped: {exc}")
            except (BenchError, httpx.HTTPError) as exc:
                # One section failing does not lose the others; the reason is kept.
                measured[name] = {"failed": str(exc) or type(exc).__name__}
                progress(f"{name}: failed: {exc}")
    return measured


def _timed_reloads(
    run: _Run, name: str, each: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """The agent section's reloads on server ``name``: latency figures, calls, signing."""
    latencies, signing, calls = [], [], 0
    for index in range(1, run.config.agent_reloads + 1):
        seconds, signed_s, made = _cycle(run.plugins[name], run.clients[name], index)
        latencies.append(seconds)
        signing.append(signed_s)
        calls += made
        if each is not None:
            each(index)
    run.progress(f"  {len(latencies)} reloads: p50 {statistics.median(latencies) * 1000:.1f} ms")
    figures = {
        "reloads": len(latencies),
        "reload_debounce_ms": Settings.model_fields["reload_debounce_ms"].default,
        "require_signature": name == "signed",
        **_latency(latencies),
        "calls": calls,
        **_server_reloads(run.clients[name]),
    }
    if name == "signed":
        figures["sign_p50_ms"] = round(statistics.median(signing) * 1000, 2)
    return figures


def _agent(run: _Run) -> dict[str, Any]:
    pid = run.servers["plain"].pid
    assert pid is not None  # started

    def sample(index: int) -> None:  # outside the timed window: after the answer came
        if index == run.config.memory_early or index % 100 == 0:
            run.rss[index] = _rss_mb(pid)

    return _timed_reloads(run, "plain", sample)


def _agent_signed(run: _Run) -> dict[str, Any]:
    return _timed_reloads(run, "signed")


def _memory(run: _Run) -> dict[str, Any]:
    config, pid, http = run.config, run.servers["plain"].pid, run.clients["plain"]
    assert pid is not None  # started
    if config.memory_early not in run.rss:
        raise BenchError("the agent section did not reach the first memory reading")
    # The agent section's cycles come first, on the same server.
    for index in range(config.agent_reloads + 1, config.memory_cycles + 1):
        _cycle(run.plugins["plain"], http, index)
        if index % 100 == 0 or index == config.memory_cycles:
            run.rss[index] = _rss_mb(pid)
            run.progress(f"  {index} cycles: RSS {run.rss[index][0]:.1f} MB")
    early, late = run.rss[config.memory_early], run.rss[config.memory_cycles]
    return {
        "cycles": config.memory_cycles,
        "early_cycle": config.memory_early,
        "rss_mb_early": round(early[0], 1),
        "rss_mb_late": round(late[0], 1),
        "growth_pct": _growth(early[0], late[0]),
        # The supervising `agentd serve` process alone (it neither loads nor runs plugins).
        "supervisor_rss_mb_early": round(early[1], 1),
        "supervisor_rss_mb_late": round(late[1], 1),
        "samples": [[cycle, round(s, 1), round(t, 1)] for cycle, (s, t) in sorted(run.rss.items())],
        **_server_reloads(http),
    }


def _tool_call(http: httpx.Client) -> str | None:
    """The bench tool's answer (its version), or None while it is not served."""
    r = http.post(CALL_TOOL, json={"name": TOOL, "argumentsJson": "{}"})
    if r.status_code != 200:
        return None
    return json.loads(r.json()["resultJson"])


def _tool_version(run: _Run, version: str) -> float:
    """Write the bench tool file answering ``version`` (renamed over it) and call until it
    answers so: the seconds from the completed rename (a build, when not in the cache)."""
    plugins, http = run.plugins["plain"], run.clients["plain"]
    path = plugins.folder / "tools" / f"{TOOL}.py"
    path.parent.mkdir(exist_ok=True)
    failed_before = _server_reloads(http, "tools")["reloads_not_ok"]
    tmp = path.with_name(f".{path.name}.tmp")  # hidden: the watcher ignores it
    tmp.write_text(TOOL_FILE.format(version=version, name=TOOL))
    os.replace(tmp, path)
    written = checked = time.perf_counter()
    while _tool_call(http) != version:
        now = time.perf_counter()
        if now - checked > 0.5:  # a build that failed ends the wait (with the server's why)
            checked = now
            if _server_reloads(http, "tools")["reloads_not_ok"] > failed_before:
                lines = run.logs["plain"].read_text(errors="replace").splitlines()
                why = next((line for line in reversed(lines) if path.name in line), "")
                raise BenchError(f"tool version {version} did not load: {why[-600:]}")
        if now - written > TOOL_BUILD_TIMEOUT_S:
            raise BenchError(
                f"tool version {version} did not answer within {TOOL_BUILD_TIMEOUT_S:g} s"
                " (does this node reload tool files?)"
            )
        time.sleep(0.01)
    return time.perf_counter() - written


def _tool(run: _Run) -> dict[str, Any]:
    """Versions A and B of a tool file (each new to the tools cache: built once), then A
    again: the cache hit's time to the first call answered by A, the builds' beside it."""
    if not run.config.tool_builds:
        raise Skipped("--quick: each of the two tool builds takes 10-25 s; a full run measures")
    if importlib.util.find_spec("agentd.plugins.tools") is None:
        raise Skipped("tool reload is not in this agentd (no agentd.plugins.tools)")
    # A version names this run: its content was never built, so its first write builds.
    nonce = uuid.uuid4().hex[:12]
    first, second = f"A-{nonce}", f"B-{nonce}"
    uncached = []
    for version in (first, second):
        run.progress(f"  building tool version {version} ...")
        uncached.append(_tool_version(run, version))
    cached = _tool_version(run, first)
    run.progress(f"  back to A (in the tools cache): {cached * 1000:.0f} ms")
    return {
        "tool": TOOL,
        "uncached_s": [round(t, 2) for t in uncached],
        "cached_s": round(cached, 3),
        **_server_reloads(run.clients["plain"], "tools"),
    }


class _Callers:
    """Threads calling the model without pause while it reloads, each on its own client:
    the calls a reload must not fail."""

    def __init__(self, url: str, count: int) -> None:
        self.calls = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._call, args=(url,), daemon=True) for _ in range(count)
        ]

    def _call(self, url: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            while not self._stop.is_set():
                error = _model_call(http)[1]
                with self._lock:
                    self.calls += 1
                    if error is not None:
                        self.failures.append(error)

    def __enter__(self) -> _Callers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


def _model_call(http: httpx.Client) -> tuple[str | None, str | None]:
    """One inference on the model: (the version that answered, None) or (None, why not)."""
    try:
        r = http.post(MODEL_INFER, json=MODEL_REQUEST)
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}: {exc}"
    if r.status_code != 200:
        return None, f"HTTP {r.status_code}: {r.text[:200]}"
    return r.json().get("model_version"), None


def _model(run: _Run) -> dict[str, Any]:
    """The decision model's copy in the plugin folder, its config rewritten with a new
    version each time, while callers keep calling it: from the completed rename to the
    first answer by the new version, and every call's outcome."""
    folder = run.plugins["plain"].folder / "models" / MODEL
    config = folder / "config.yaml"
    original = config.read_text()
    http = run.clients["plain"]
    if _model_call(http)[0] != "1":
        raise BenchError(f"the copy of {MODEL} in the plugin folder does not serve version 1")
    latencies, calls, failures = [], 0, []
    started = time.perf_counter()
    with _Callers(str(http.base_url), MODEL_CALLERS) as callers:
        for version in range(2, run.config.model_reloads + 2):
            text = re.sub(r"^version: .*$", f'version: "{version}"', original, count=1, flags=re.M)
            # Beside the folder under a hidden name: not a file of the model, same file system.
            tmp = folder.parent / f".{MODEL}-config.yaml.tmp"
            tmp.write_text(text)
            os.replace(tmp, config)
            written = time.perf_counter()
            while True:
                answered, error = _model_call(http)
                calls += 1
                if error is not None:
                    failures.append(error)
                if answered == str(version):
                    latencies.append(time.perf_counter() - written)
                    break
                if time.perf_counter() - written > NEW_VERSION_TIMEOUT_S:
                    raise BenchError(
                        f"{MODEL} version {version} did not answer within"
                        f" {NEW_VERSION_TIMEOUT_S} s (does this node reload model folders?)"
                    )
    seconds = time.perf_counter() - started
    run.progress(f"  {len(latencies)} reloads: p50 {statistics.median(latencies) * 1000:.1f} ms")
    failures += callers.failures
    return {
        "model": MODEL,
        "reloads": len(latencies),
        "reload_debounce_ms": Settings.model_fields["reload_debounce_ms"].default,
        **_latency(latencies),
        "callers": MODEL_CALLERS + 1,
        "calls": calls + callers.calls,
        "seconds": round(seconds, 3),
        "failed_calls": len(failures),
        "failures": failures[:5],
        **_server_reloads(http, "models"),
    }


SECTIONS: dict[str, Callable[[_Run], dict[str, Any]]] = {
    "agent": _agent,
    "agent_signed": _agent_signed,
    "memory": _memory,
    "tool": _tool,
    "model": _model,
}


# ---------------------------------------------------------------- document


def _target(name: str, description: str, value: Any, met: bool) -> dict[str, Any]:
    return {"name": name, "description": description, "value": value, "met": bool(met)}


def _targets(name: str, section: dict[str, Any]) -> list[dict[str, Any]]:
    if "skipped" in section or "failed" in section:
        return []
    if name in ("agent", "agent_signed"):
        signed = " with require_signature" if name == "agent_signed" else ""
        return [
            _target(
                f"{name}_p99",
                f"write -> first answer by the new version{signed}: p99 < {AGENT_P99_MS:g} ms",
                section["p99_ms"],
                section["p99_ms"] < AGENT_P99_MS and section["reloads_not_ok"] == 0,
            )
        ]
    if name == "tool":
        return [
            _target(
                "tool_cached",
                f"tool file back to a version in the tools cache: first call answered by it"
                f" in < {TOOL_CACHED_S:g} s",
                section["cached_s"],
                section["cached_s"] < TOOL_CACHED_S,
            )
        ]
    if name == "model":
        return [
            _target(
                "model_no_failed_calls",
                f"calls to {section['model']} while it reloads: 0 failed",
                section["failed_calls"],
                section["failed_calls"] == 0 and section["reloads_not_ok"] == 0,
            )
        ]
    if name == "memory":
        return [
            _target(
                "memory_flat",
                f"server RSS after {section['cycles']:,} reload cycles within"
                f" {MEMORY_GROWTH_PCT:g}% of after {section['early_cycle']} (%)",
                section["growth_pct"],
                abs(section["growth_pct"]) <= MEMORY_GROWTH_PCT,
            )
        ]
    return []


def build_document(measured: dict[str, Any], *, quick: bool, now: datetime) -> dict[str, Any]:
    sections = {name: {**s, "targets": _targets(name, s)} for name, s in measured.items()}
    return {
        "suite": SUITE,
        "timestamp": now.isoformat(),
        "quick": quick,
        "machine": machine_info(),
        "versions": package_versions(["agentd", "watchfiles", "cryptography", "httpx"]),
        "sections": sections,
        "targets": [t for s in sections.values() for t in s["targets"]],
    }


def _figures(name: str, s: dict[str, Any]) -> str:
    if name in ("agent", "agent_signed"):
        text = (
            f"{s['reloads']} reloads: p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms,"
            f" max {s['max_ms']} ms; server's own reload {s['server_reload_mean_ms']} ms mean"
        )
        if name == "agent_signed":
            text += f"; signing the folder {s['sign_p50_ms']} ms p50"
        return text
    if name == "tool":
        return (
            f"back to version A (in the tools cache): {s['cached_s']} s; the first writes"
            f" of A and B (built): {', '.join(f'{t} s' for t in s['uncached_s'])}"
        )
    if name == "model":
        return (
            f"{s['reloads']} reloads of {s['model']}: new version answers after p50"
            f" {s['p50_ms']} ms, max {s['max_ms']} ms; {s['calls']:,} calls by"
            f" {s['callers']} callers, {s['failed_calls']} failed"
        )
    if name == "memory":
        return (
            f"server RSS {s['rss_mb_early']} MB after {s['early_cycle']} cycles,"
            f" {s['rss_mb_late']} MB after {s['cycles']:,} ({s['growth_pct']:+}%)"
        )
    return str(s)[:500]


def render(document: dict[str, Any], console: Console) -> None:
    render_sections("reload", document, console, _figures)


def run_suite(
    quick: bool = False,
    json_out: bool = False,
    results_dir: Path | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the sections, write the JSON files, print a table (or the JSON)."""
    config = QUICK if quick else FULL
    return run_and_publish(
        SUITE,
        measure=lambda progress: _measure(config, progress),
        build=lambda measured, now: build_document(measured, quick=quick, now=now),
        render=render,
        json_out=json_out,
        results_dir=results_dir,
        console=console,
    )
