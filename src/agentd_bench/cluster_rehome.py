"""The re-home section of ``agentd bench cluster``: three ``agentd serve --etcd`` nodes on
one etcd; each trial kills one node's server process with SIGKILL (no leaving, no lease
revoked) and times how long until etcd shows every partition owned by the survivors. The
killed node is started again with its id and the next trial waits until the three own the
partitions as planned.

The time runs from the kill to the first etcd read that shows no partition unowned or held
by the dead node; its lease has to expire first (the lease TTL), then the survivors claim.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentd.cluster.etcd import EtcdClient
from agentd.cluster.membership import cluster_prefix
from agentd.cluster.ownership import plan_owners
from agentd.errors import AgentdError
from agentd_bench.cluster_servers import etcd_server
from agentd_bench.errors import BenchError
from agentd_bench.servers import ServerError, ServerProcess, agentd_env, descendants, free_port

__all__ = ["RehomeConfig", "measure_rehome"]

NODES = ("n0", "n1", "n2")
CLUSTER = "bench"


@dataclass(frozen=True, slots=True)
class RehomeConfig:
    trials: int
    lease_ttl_s: float
    partitions: int = 1024


class _Node:
    def __init__(self, node_id: str, etcd: str, config: RehomeConfig, workdir: Path) -> None:
        self.node_id = node_id
        port = free_port()
        env = {
            **agentd_env(),
            "AGENTD_NODE_ID": node_id,
            "AGENTD_CLUSTER": CLUSTER,
            "AGENTD_ADVERTISE": f"127.0.0.1:{free_port()}",
            "AGENTD_LEASE_TTL_S": str(config.lease_ttl_s),
            "AGENTD_PARTITIONS": str(config.partitions),
            "AGENTD_STATE_PATH": str(workdir / "state.db"),  # shared by the nodes
        }
        argv = [sys.executable, "-m", "agentd", "serve", "--port", str(port), "--etcd", etcd]
        log = workdir / f"node-{node_id}.log"
        self.server = ServerProcess(f"node {node_id}", argv, port, log, env=env, cwd=workdir)

    def start(self) -> None:
        self.server.start()
        self.wait_listening()

    def wait_listening(self) -> None:
        try:
            self.server.wait_listening(timeout=90)
        except ServerError as exc:
            tail = self.server.log_path.read_text(errors="replace")[-1500:]
            raise BenchError(f"{exc}: {tail}") from exc

    def kill_hard(self) -> None:
        """SIGKILL the process that runs the node (Envoy, with the app in it); the
        ``serve`` above it then exits on its own."""
        pid = self.server.pid
        assert pid is not None
        below = descendants(pid)
        if not below:
            raise BenchError(f"node {self.node_id}: no server process under serve ({pid})")
        for each in below:
            os.kill(each, signal.SIGKILL)

    def stop(self) -> None:
        self.server.stop()


async def _owners(client: EtcdClient, partitions: int) -> list[str]:
    prefix = cluster_prefix(CLUSTER) + "partitions/"
    items, _ = await client.get_prefix(prefix)
    owners = [""] * partitions
    for item in items:
        try:
            owners[int(item.key[len(prefix) :])] = item.value.decode()
        except (ValueError, IndexError):
            continue
    return owners


async def _wait(
    client: EtcdClient, partitions: int, done: Callable[[list[str]], bool], timeout: float
) -> float:
    """The perf_counter time of the first etcd read (every 10 ms) where ``done(owners)``
    holds."""
    started = time.perf_counter()
    while True:
        try:
            if done(await _owners(client, partitions)):
                return time.perf_counter()
        except AgentdError:  # etcd busy for a moment: read again
            pass
        if time.perf_counter() - started > timeout:
            raise BenchError(f"partitions not settled within {timeout:g} s")
        await asyncio.sleep(0.01)


async def _trials(
    url: str, nodes: Sequence[_Node], config: RehomeConfig, progress: Callable[[str], None]
) -> list[dict[str, Any]]:
    ids = [n.node_id for n in nodes]
    planned = plan_owners(config.partitions, ids)
    results = []
    async with EtcdClient(url) as client:
        await _wait(client, config.partitions, lambda o: o == planned, 120)
        for trial in range(config.trials):
            victim = nodes[trial % len(nodes)]
            survivors = {i for i in ids if i != victim.node_id}
            held = sum(o == victim.node_id for o in await _owners(client, config.partitions))
            killed = time.perf_counter()
            victim.kill_hard()
            settled = await _wait(
                client,
                config.partitions,
                functools.partial(_all_in, survivors),
                10 * config.lease_ttl_s + 30,
            )
            seconds = settled - killed
            results.append(
                {"node": victim.node_id, "partitions": held, "rehome_s": round(seconds, 3)}
            )
            progress(
                f"re-home trial {trial + 1}: {held} partitions of {victim.node_id}"
                f" owned by survivors {seconds:.2f} s after kill -9"
            )
            victim.stop()
            if trial + 1 < config.trials:  # after the last trial nothing needs it back
                await asyncio.to_thread(victim.start)
                await _wait(client, config.partitions, lambda o: o == planned, 120)
    return results


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def measure_rehome(
    config: RehomeConfig, workdir: Path, progress: Callable[[str], None]
) -> dict[str, Any]:
    """Start etcd and three nodes, run the trials; per-trial times and p50/p99."""
    with ExitStack() as stack:
        etcd = stack.enter_context(etcd_server(workdir))
        nodes = [_Node(node_id, etcd.url, config, workdir) for node_id in NODES]
        for node in nodes:  # started together, start-up being most of a quick run's time
            stack.callback(node.stop)
            node.server.start()
        for node in nodes:
            node.wait_listening()
        trials = asyncio.run(_trials(etcd.url, nodes, config, progress))
    times = [t["rehome_s"] for t in trials]
    return {
        "nodes": len(NODES),
        "partitions": config.partitions,
        "lease_ttl_s": config.lease_ttl_s,
        "trials": trials,
        "p50_s": round(statistics.median(times), 3),
        "p99_s": round(_percentile(times, 99), 3),
        "max_s": max(times),
    }


def _all_in(alive: set[str], owners: list[str]) -> bool:
    return all(owner in alive for owner in owners)
