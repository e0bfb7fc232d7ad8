"""Run a swarm in-process and measure it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import resource
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from agentd.agents import Address, AgentRegistry
from agentd.node import NodeOptions, open_node
from agentd.settings import Settings
from agentd.swarm.agents import SwarmRun, Tally, shard_address
from agentd.swarm.host import SwarmHost
from agentd.swarm.latency import LatencyHistogram

__all__ = ["SwarmResult", "run_swarm"]


@dataclass(frozen=True)
class SwarmResult:
    agents: int
    distinct_results: int
    duplicates: int
    ok: bool
    wall_s: float
    decisions_per_s: float
    peak_rss_mb: float
    bytes_per_agent: float
    turn_p50_ms: float
    turn_p99_ms: float
    inference_runs: int
    mean_batch: float
    store_writes: int
    persistence: bool
    actions: dict[str, int]
    # Wall-clock (Unix) times of the first start message and the last report: lets
    # runs in separate processes be lined up (``agentd bench swarm``'s two halves).
    started_at: float
    finished_at: float
    # ``--processes N``: how many node processes ran it; each one's peak RSS (peak_rss_mb
    # is then their sum).
    processes: int = 1
    process_peak_rss_mb: tuple[float, ...] = ()
    # Per process: CPU seconds (all its threads) from the first start message until its
    # own collector shards were done, and seconds from the run's start to that moment
    # (the wall time is the last of these).
    process_cpu_s: tuple[float, ...] = ()
    process_finished_s: tuple[float, ...] = ()
    # Collector shards the reports were counted by (decider i reports to shard i % K).
    collector_shards: int = 1

    @classmethod
    def measured(
        cls,
        *,
        agents: int,
        tally: Tally,
        wall_s: float,
        latency: LatencyHistogram,
        inference_runs: int,
        rows_run: int,
        peak_rss_mb: float,
        rss_growth: float,
        store_writes: int,
        persistence: bool,
        started_at: float,
        finished_at: float,
    ) -> SwarmResult:
        """A run's result from what it measured (one process or the sum of many): the
        derived figures and their rounding in one place; per-process fields default to
        one process (``dataclasses.replace`` sets them)."""
        return cls(
            agents=agents,
            distinct_results=tally.distinct,
            duplicates=tally.duplicates,
            ok=tally.distinct == agents and tally.duplicates == 0,
            wall_s=round(wall_s, 3),
            decisions_per_s=round(agents / wall_s, 1),
            peak_rss_mb=round(peak_rss_mb, 1),
            bytes_per_agent=round(rss_growth / agents, 1),
            turn_p50_ms=round(latency.quantile(0.5) * 1000, 3),
            turn_p99_ms=round(latency.quantile(0.99) * 1000, 3),
            inference_runs=inference_runs,
            mean_batch=round(rows_run / inference_runs, 1) if inference_runs else 0.0,
            store_writes=store_writes,
            persistence=persistence,
            actions=dict(zip(LABELS, tally.actions, strict=True)),
            started_at=round(started_at, 4),
            finished_at=round(finished_at, 4),
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _TurnLatency:
    """Records decider turn times (the collector's turns would swamp the picture).

    The host reports one turn in ``SAMPLE`` (``observe_every``): a million-agent run still
    yields >100k samples, and neither the clock reads nor the histogram sit on every turn.
    """

    SAMPLE = 8

    def __init__(self) -> None:
        self.histogram = LatencyHistogram()

    def turn_finished(self, agent_type: str, outcome: str, seconds: float) -> None:
        if agent_type == "decider":
            self.histogram.record(seconds)


_BURST = 4096  # start messages handed to the host per tell_many_nowait
LABELS = ("wait", "explore", "exploit", "retreat")  # the decision model's actions


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _SwarmSettings(Settings):
    """A swarm's node settings: from ``run_swarm``'s arguments only, never from
    ``AGENTD_*`` variables or a config file (those configure ``agentd serve``)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def _swarm_settings(
    agents: int, *, persist: bool, state_path: Path, plugins: Path, workers: int
) -> Settings:
    """The node a swarm of ``agents`` runs on: every agent in memory with room for its
    start message, no passivation during the run, and no default deadline (a told turn
    gets no watchdog, ``ctx.infer`` no timer). ``plugins`` should hold no models: the
    built-in ``decision`` model is the one the deciders ask."""
    return _SwarmSettings(
        plugins=plugins,
        workers=workers,
        max_queued_turns=max(workers * 4, 16_384),
        max_mailbox=agents + 1,
        max_agent_instances=agents + 16,
        idle_seconds=3600,
        state_store="sqlite" if persist else "memory",
        state_path=state_path,
        default_timeout_s=None,
    )


def _node_options(latency: _TurnLatency, freeze_every: int) -> NodeOptions:
    """The swarm's node: its own host and turn observer; no metrics registry (a histogram
    observation per model call), no language models and no tools (neither loaded nor
    counted in the run's time and memory). The placement is static (``--processes N``:
    fixed, and every process opens the store before the start barrier)."""
    return NodeOptions(
        host_type=SwarmHost,
        host_options={
            "observer": latency,
            "observe_every": _TurnLatency.SAMPLE,
            "freeze_every": freeze_every,
            "static_placement": True,
        },
        metrics=False,
        generation=False,
        tools=False,
    )


async def _start_deciders(
    host: SwarmHost,
    ids: Sequence[int],
    features: np.ndarray,
    progress: Callable[[], None] | None = None,
) -> None:
    """Tell deciders ``ids`` (all this node's own) their start messages, ``_BURST`` at a
    time; ``features`` holds their rows in the same order."""
    new_address = tuple.__new__  # Address(...) without its Python-level __new__
    for first in range(0, len(ids), _BURST):
        some = ids[first : first + _BURST]
        addresses = [new_address(Address, ("decider", str(i))) for i in some]
        # One-row views of the agents' features, cut in one C loop.
        rows = features[first : first + len(some)].reshape(len(some), 1, -1)
        messages = list(zip(some, rows, strict=True))
        sent = 0
        while (sent := host.tell_many_nowait(addresses, messages, sent, local=True)) < len(some):
            await host.pool.wait_for_room()  # backpressure: the run queue is full
        if progress is not None:
            progress()


def _features(n: int, seed: int) -> np.ndarray:
    # Situations spread over the model's input range; row i belongs to agent i.
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 16), dtype=np.float32)


async def run_swarm(
    agents: int,
    *,
    persist: bool = True,
    state_path: Path | None = None,
    workers: int = 8192,
    seed: int = 0,
    freeze_every: int = 10_000,
    progress: Callable[[int], None] | None = None,
) -> SwarmResult:
    """Start ``agents`` deciders, wait until the collector has heard from every one."""
    if agents < 1:
        raise ValueError("a swarm needs at least one agent")
    features = _features(agents, seed)
    # One process: one collector shard (more would only add activations on one loop).
    run = SwarmRun(agents, (shard_address("c0"),))
    registry = AgentRegistry()
    registry.register(run.decider_type)
    registry.register(run.collector_type)
    latency = _TurnLatency()
    options = _node_options(latency, freeze_every)
    with tempfile.TemporaryDirectory(prefix="agentd-swarm-") as scratch:
        settings = _swarm_settings(
            agents,
            persist=persist,
            state_path=state_path or Path(scratch) / "swarm.db",
            plugins=Path(scratch) / "plugins",  # none: the built-in models only
            workers=workers,
        )
        # The node's start ends with gc.collect() and gc.freeze(): the long-lived objects
        # made so far need no more GC passes.
        async with open_node(settings, registry=registry, options=options) as node:
            host = node.runtime.host
            assert isinstance(host, SwarmHost)
            rss_before = _rss_bytes()
            cpu_before = _cpu_seconds()
            started_at = time.time()
            started = time.perf_counter()
            try:
                report = None if progress is None else lambda: progress(host.turns)
                await _start_deciders(host, range(agents), features, report)
                while not run.done.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(run.done.wait(), 0.25)
                    if report is not None:
                        report()
                wall = time.perf_counter() - started
                cpu = _cpu_seconds() - cpu_before
                finished_at = time.time()
                rss_after = _rss_bytes()
                tally = run.tally(host)
                batcher = node.inference.batcher("decision")
                runs = batcher.stats.runs if batcher else 0
                rows_run = batcher.stats.rows_run if batcher else 0
            finally:
                gc.unfreeze()
        # The node is closed: the store has committed the last states.
        store_writes = getattr(host.store, "writes", 0)
    result = SwarmResult.measured(
        agents=agents,
        tally=tally,
        wall_s=wall,
        latency=latency.histogram,
        inference_runs=runs,
        rows_run=rows_run,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        rss_growth=max(0, rss_after - rss_before),
        store_writes=store_writes,
        persistence=persist,
        started_at=started_at,
        finished_at=finished_at,
    )
    return replace(result, process_cpu_s=(round(cpu, 2),), process_finished_s=(round(wall, 3),))
