"""``agentd swarm --processes N``: one swarm over N node processes on this machine.

The parent starts N children (``python -m agentd.swarm.multi SPEC``), each a swarm node
with its identity (``p0``..; see :func:`agentd.cluster.supervisor.local_peers`): the same
agent types, the static placement of ``--processes N`` and peers over Unix sockets, all
persisting to one SQLite file. Each child starts only the deciders it owns (no start is
forwarded). The collector is sharded: N shards, one owned by each process (their names
are searched so that the placement puts one on each), decider ``i`` reports to shard
``i % N``, so a process runs 1/N of the collector turns and a report crosses to another
process with odds (N-1)/N, as a forwarded tell (batched by the peer clients); a report
to the process's own shard takes the local path.

The children talk to the parent in JSON lines: a child writes ``ready`` once its node has
started, the parent answers ``go`` to all (a barrier: start-up is not in the wall time),
each child writes ``reports`` (its shards' count so far) while it runs and ``done`` when
its own shards have heard from all of their agents; once all are done the parent answers
``stop`` to all, and each child closes its node and writes its ``stats``. The wall time
runs from the first start message to the last shard's finish. A child that exits before
that fails the run (StartupError naming it and its exit status).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import resource
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from agentd.agents import Address, AgentRegistry
from agentd.cluster.placement import Placement
from agentd.cluster.supervisor import die_with_parent, local_peers
from agentd.errors import StartupError
from agentd.node import open_node
from agentd.swarm.agents import SwarmRun, Tally, shard_address
from agentd.swarm.host import SwarmHost
from agentd.swarm.latency import LatencyHistogram
from agentd.swarm.run import (
    SwarmResult,
    _cpu_seconds,
    _features,
    _node_options,
    _rss_bytes,
    _start_deciders,
    _swarm_settings,
    _TurnLatency,
)

__all__ = ["run_swarm_processes"]

_START_TIMEOUT_S = 120.0


async def run_swarm_processes(
    agents: int,
    processes: int,
    *,
    persist: bool = True,
    state_path: Path | None = None,
    workers: int = 8192,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> SwarmResult:
    """Run a swarm of ``agents`` over ``processes`` node processes and measure it: the wall
    time from the first start message (after every process has started) to the last
    report, peak RSS per process and in total. Raises StartupError when a process fails."""
    if agents < 1:
        raise ValueError("a swarm needs at least one agent")
    if processes < 1:
        raise ValueError("at least one process")
    peers = local_peers(processes, prefix="agentd-swarm-run-")
    children: list[asyncio.subprocess.Process] = []
    try:
        with tempfile.TemporaryDirectory(prefix="agentd-swarm-") as scratch:
            spec = {
                "agents": agents,
                "persist": persist,
                "state_path": str(state_path or Path(scratch) / "swarm.db"),
                "plugins": str(Path(scratch) / "plugins"),
                "workers": workers,
                "seed": seed,
                "peers": peers.peers,
            }
            for node in peers.ids:
                children.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable,
                        "-m",
                        "agentd.swarm.multi",
                        json.dumps({**spec, "node_id": node}),
                        stdin=asyncio.subprocess.PIPE,
                        stdout=asyncio.subprocess.PIPE,
                        preexec_fn=die_with_parent(),
                    )
                )
            return await _conduct(children, peers.ids, agents, persist, progress)
    finally:
        for child in children:
            if child.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.kill()
                await child.wait()
        peers.remove()


async def _conduct(
    children: list[asyncio.subprocess.Process],
    names: tuple[str, ...],
    agents: int,
    persist: bool,
    progress: Callable[[int], None] | None,
) -> SwarmResult:
    async def read(index: int) -> dict[str, Any]:
        stdout = children[index].stdout
        assert stdout is not None
        line = await stdout.readline()
        if not line:
            status = await children[index].wait()
            raise StartupError(f"swarm process {names[index]} exited with status {status}")
        return json.loads(line)

    async def tell_all(command: str) -> None:
        for child in children:
            assert child.stdin is not None
            child.stdin.write(command.encode() + b"\n")
            with contextlib.suppress(ConnectionError):
                await child.stdin.drain()

    async with asyncio.timeout(_START_TIMEOUT_S):
        await asyncio.gather(*(read(i) for i in range(len(children))))
    await tell_all("go")
    reports = [0] * len(children)

    async def follow(index: int) -> dict[str, Any]:
        """Progress lines from one process until its shards are done."""
        while True:
            message = await read(index)
            if "done" in message:
                return message
            reports[index] = message["reports"]
            if progress is not None:
                progress(sum(reports))

    done = await asyncio.gather(*(follow(i) for i in range(len(children))))
    await tell_all("stop")
    stats = await asyncio.gather(*(read(i) for i in range(len(children))))
    for child in children:
        await child.wait()
    return _result(agents, persist, done, stats)


def _result(
    agents: int, persist: bool, done: list[dict[str, Any]], stats: list[dict[str, Any]]
) -> SwarmResult:
    started_at = min(s["started_at"] for s in stats)
    finished_at = max(d["finished_at"] for d in done)
    wall = finished_at - started_at
    tally = Tally(0, 0, (0, 0, 0, 0))
    for d in done:
        tally += Tally(d["distinct"], d["duplicates"], tuple(d["actions"]))
    latency = LatencyHistogram()
    for s in stats:
        for index, count in s["latency"].items():
            latency.counts[int(index)] += count
            latency.total += count
    peaks = [s["peak_rss_mb"] for s in stats]
    result = SwarmResult.measured(
        agents=agents,
        tally=tally,
        wall_s=wall,
        latency=latency,
        inference_runs=sum(s["runs"] for s in stats),
        rows_run=sum(s["rows"] for s in stats),
        peak_rss_mb=sum(peaks),
        rss_growth=sum(s["rss_growth"] for s in stats),
        store_writes=sum(s["store_writes"] for s in stats),
        persistence=persist,
        started_at=started_at,
        finished_at=finished_at,
    )
    return replace(
        result,
        processes=len(stats),
        process_peak_rss_mb=tuple(peaks),
        process_cpu_s=tuple(round(d["cpu_s"], 2) for d in done),
        process_finished_s=tuple(round(d["finished_at"] - started_at, 3) for d in done),
        collector_shards=done[0]["shards"],
    )


# -- one child process -----------------------------------------------------------------------


def _owned(node: str, placement: Placement, agents: int) -> list[int]:
    """The deciders (by index) that ``node`` owns: the placement's rule (CRC-32 of the
    address text, as :func:`agentd.cluster.placement.partition_of`), in one pass."""
    mine = [owner == node for owner in placement.owners]
    count = len(mine)
    crc32 = zlib.crc32
    return [i for i in range(agents) if mine[crc32(b"decider/%d" % i) % count]]


def collector_shards(placement: Placement, per_node: int = 1) -> tuple[Address, ...]:
    """Collector shard addresses, ``per_node`` owned by each node of ``placement``: the
    names ``c0``, ``c1``, ... taken in order while their owner has fewer than ``per_node``
    (every process computes the same list from the same placement). The shards of one
    node are spread over the list, so that ``i % K`` sends each node an equal share."""
    nodes = sorted(set(placement.owners))
    taken: dict[str, list[Address]] = {node: [] for node in nodes}
    name = 0
    while any(len(shards) < per_node for shards in taken.values()):
        if name > 1000 * len(nodes) * per_node:  # a placement that starves a node
            raise StartupError("no collector shard names found for every swarm process")
        address = shard_address(f"c{name}")
        shards = taken[placement.owner(address)]
        if len(shards) < per_node:
            shards.append(address)
        name += 1
    return tuple(taken[node][k] for k in range(per_node) for node in nodes)


def _write(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def _read_command(loop: asyncio.AbstractEventLoop) -> str:
    line = await loop.run_in_executor(None, sys.stdin.readline)
    return line.strip() or "stop"  # the parent is gone: stop


async def _child(spec: dict[str, Any]) -> None:
    agents: int = spec["agents"]
    node_id: str = spec["node_id"]
    peers: list[str] = spec["peers"]
    settings = _swarm_settings(
        agents,
        persist=spec["persist"],
        state_path=Path(spec["state_path"]),
        plugins=Path(spec["plugins"]),
        workers=spec["workers"],
    ).model_copy(
        update={
            "node_id": node_id,
            "peers": peers,
            "peer_listen": dict(p.split("=", 1) for p in peers)[node_id],
        }
    )
    placement = Placement.spread([p.split("=", 1)[0] for p in peers], settings.partitions)
    shards = collector_shards(placement)
    run = SwarmRun(agents, shards, [a for a in shards if placement.owner(a) == node_id])
    registry = AgentRegistry()
    registry.register(run.decider_type)
    registry.register(run.collector_type)
    latency = _TurnLatency()
    options = _node_options(latency, 10_000)
    owned = _owned(node_id, placement, agents)
    # Only this process's rows of the features: the same as one process would give them.
    features = _features(agents, spec["seed"])[owned]
    gc.collect()
    loop = asyncio.get_running_loop()
    async with open_node(settings, registry=registry, options=options) as node:
        host = node.runtime.host
        assert isinstance(host, SwarmHost)
        _write({"ready": True, "owned": len(owned)})
        if await _read_command(loop) != "go":
            return
        rss_before = _rss_bytes()
        cpu_before = _cpu_seconds()
        started_at = time.time()
        try:
            await _start_deciders(host, owned, features)
            while not run.done.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(run.done.wait(), 0.25)
                if not run.done.is_set():
                    _write({"reports": run.tally(host).distinct})
            cpu = _cpu_seconds() - cpu_before
            tally = run.tally(host)
            _write(
                {
                    "done": True,
                    # A process whose shards expect no report was done before the start.
                    "finished_at": max(run.finished_at, started_at),
                    "cpu_s": cpu,
                    "shards": len(shards),
                    "distinct": tally.distinct,
                    "duplicates": tally.duplicates,
                    "actions": list(tally.actions),
                }
            )
            await _read_command(loop)  # "stop" (or the parent is gone)
            rss_growth = max(0, _rss_bytes() - rss_before)
            batcher = node.inference.batcher("decision")
            runs = batcher.stats.runs if batcher else 0
            rows_run = batcher.stats.rows_run if batcher else 0
        finally:
            gc.unfreeze()
    histogram = latency.histogram
    _write(
        {
            "started_at": started_at,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rss_growth": rss_growth,
            "latency": {str(i): c for i, c in enumerate(histogram.counts) if c},
            "runs": runs,
            "rows": rows_run,
            "store_writes": getattr(host.store, "writes", 0),
        }
    )


def main(argv: list[str]) -> int:
    import uvloop

    from agentd.swarm.gc_policy import many_objects_gc

    spec = json.loads(argv[0])
    with many_objects_gc():
        uvloop.run(_child(spec))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
