"""Run a swarm in-process and measure it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from agentd.agents import Address, AgentRegistry
from agentd.node import NodeOptions, open_node
from agentd.settings import Settings
from agentd.swarm.agents import COLLECTOR, Collector, Decider, make_collector
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
    collector_type = make_collector(agents)
    registry = AgentRegistry()
    registry.register(Decider)
    registry.register(collector_type)
    latency = _TurnLatency()
    # The swarm's node: its own host and turn observer; no metrics registry (a histogram
    # observation per model call), no language models and no tools (neither loaded nor
    # counted in the run's time and memory).
    options = NodeOptions(
        host_type=SwarmHost,
        host_options={
            "observer": latency,
            "observe_every": _TurnLatency.SAMPLE,
            "freeze_every": freeze_every,
        },
        metrics=False,
        generation=False,
        tools=False,
    )
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
            started_at = time.time()
            started = time.perf_counter()
            try:
                new_address = tuple.__new__  # Address(...) without its Python-level __new__
                for first in range(0, agents, _BURST):
                    ids = range(first, min(agents, first + _BURST))
                    addresses = [new_address(Address, ("decider", str(i))) for i in ids]
                    # One-row views of the agents' features, cut in one C loop.
                    rows = features[first : first + len(ids)].reshape(len(ids), 1, -1)
                    messages = list(zip(ids, rows, strict=True))
                    sent = 0
                    while (sent := host.tell_many_nowait(addresses, messages, sent)) < len(ids):
                        await host.pool.wait_for_room()  # backpressure: the run queue is full
                    if progress is not None:
                        progress(host.turns)
                done = collector_type.done
                while not done.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(done.wait(), 0.25)
                    if progress is not None:
                        progress(host.turns)
                wall = time.perf_counter() - started
                finished_at = time.time()
                rss_after = _rss_bytes()
                collector = host.instance(COLLECTOR)
                assert isinstance(collector, Collector)
                batcher = node.inference.batcher("decision")
                runs = batcher.stats.runs if batcher else 0
                rows_run = batcher.stats.rows_run if batcher else 0
            finally:
                gc.unfreeze()
        # The node is closed: the store has committed the last states.
        store_writes = getattr(host.store, "writes", 0)
    labels = ["wait", "explore", "exploit", "retreat"]
    return SwarmResult(
        agents=agents,
        distinct_results=int(collector.distinct),
        duplicates=int(collector.duplicates),
        ok=collector.distinct == agents and collector.duplicates == 0,
        wall_s=round(wall, 3),
        decisions_per_s=round(agents / wall, 1),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        bytes_per_agent=round(max(0, rss_after - rss_before) / agents, 1),
        turn_p50_ms=round(latency.histogram.quantile(0.5) * 1000, 3),
        turn_p99_ms=round(latency.histogram.quantile(0.99) * 1000, 3),
        inference_runs=runs,
        mean_batch=round(rows_run / runs, 1) if runs else 0.0,
        store_writes=store_writes,
        persistence=persist,
        actions={label: int(c) for label, c in zip(labels, collector.actions, strict=True)},
        started_at=round(started_at, 4),
        finished_at=round(finished_at, 4),
    )
