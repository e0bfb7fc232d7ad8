"""``agentd cluster up``: a local multi-node cluster for development.

Starts etcd (and redis-server when installed) from PATH on free loopback ports in a
temporary folder, then N ``agentd serve --etcd`` nodes on consecutive ports, and acts on the
coordinator's decisions (``scale/horizontal``): it starts and stops nodes to match the
desired count within ``[min, max]``. Ctrl-C (or SIGTERM) stops every process it started,
by PID, nodes first.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from agentd.cluster.backing import (
    Backing,
    BackingError,
    NotInstalled,
    free_port,
    spawn,
    start_etcd,
    start_redis,
    stop_process,
)

__all__ = ["LocalCluster", "UpError"]

STOP_TIMEOUT_S = 15.0
POLL_S = 1.0


class UpError(Exception):
    """A local cluster could not start (message for one line; exit 1)."""


@dataclass
class Node:
    index: int
    port: int
    peer: int
    log: Path
    process: subprocess.Popen[bytes]

    @property
    def id(self) -> str:
        return f"n{self.index}"


class LocalCluster:
    """etcd, perhaps Redis, and the nodes; owns every process it starts."""

    def __init__(
        self,
        *,
        nodes: int,
        min_nodes: int,
        max_nodes: int,
        base_port: int,
        cluster: str,
        out: TextIO = sys.stdout,
    ) -> None:
        self.initial, self.min_nodes, self.max_nodes = nodes, min_nodes, max_nodes
        self.base_port, self.cluster, self.out = base_port, cluster, out
        self.folder = Path(tempfile.mkdtemp(prefix="agentd-cluster-"))
        self.etcd_url = ""
        self.redis_url: str | None = None
        self.nodes: dict[int, Node] = {}
        self._servers: list[Backing] = []

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    # -- etcd and Redis ----------------------------------------------------------------

    def start_servers(self) -> None:
        # Each in a session of its own: Ctrl-C reaches us, we stop them after the nodes;
        # and each goes with us, even on SIGKILL.
        try:
            etcd = start_etcd(self.folder, name="agentd-dev", own_session=True)
            self._servers.append(etcd)
            self.etcd_url = etcd.url
            self.say(f"etcd:  {self.etcd_url}")
            try:
                redis = start_redis(self.folder, own_session=True)
            except NotInstalled:
                self.say("redis: not installed; the nodes share a SQLite file")
                return
        except BackingError as error:
            raise UpError(str(error)) from None
        self._servers.append(redis)
        self.redis_url = redis.url
        self.say(f"redis: {self.redis_url} (state store)")

    # -- nodes -------------------------------------------------------------------------

    def start_node(self) -> Node:
        index = min(set(range(len(self.nodes) + 1)) - set(self.nodes))
        port, peer = self.base_port + index, free_port()
        env = {
            **os.environ,
            "AGENTD_ETCD": self.etcd_url,
            "AGENTD_CLUSTER": self.cluster,
            "AGENTD_NODE_ID": f"n{index}",
            "AGENTD_PORT": str(port),
            "AGENTD_ADVERTISE": f"127.0.0.1:{peer}",
            "AGENTD_MIN_NODES": str(self.min_nodes),
            "AGENTD_MAX_NODES": str(self.max_nodes),
        }
        if self.redis_url is not None:
            env |= {"AGENTD_STATE_STORE": "redis", "AGENTD_REDIS_URL": self.redis_url}
        else:
            env |= {
                "AGENTD_STATE_STORE": "sqlite",
                "AGENTD_STATE_PATH": str(self.folder / "agents.db"),
            }
        log = self.folder / f"n{index}.log"
        argv = [
            sys.executable,
            "-m",
            "agentd",
            "serve",
            "--etcd",
            self.etcd_url,
            "--port",
            str(port),
        ]
        process = spawn(argv, log, env=env, own_session=True)
        node = Node(index, port, peer, log, process)
        self.nodes[index] = node
        self.say(
            f"node {node.id}: http://127.0.0.1:{port} (peer 127.0.0.1:{peer}, pid "
            f"{process.pid}, log {log})"
        )
        return node

    def stop_node(self, node: Node) -> None:
        self.nodes.pop(node.index, None)
        stop_process(node.process, STOP_TIMEOUT_S)
        self.say(f"node {node.id}: stopped")

    def reap(self) -> None:
        """Forget nodes that exited by themselves (the decision may start others)."""
        for node in list(self.nodes.values()):
            code = node.process.poll()
            if code is not None:
                del self.nodes[node.index]
                lines = node.log.read_text(errors="replace").strip().splitlines()
                self.say(f"node {node.id}: exited ({code}): {(lines or ['no output'])[-1][:300]}")

    def scale_to(self, desired: int) -> None:
        target = max(self.min_nodes, min(self.max_nodes, desired))
        while len(self.nodes) < target:
            self.start_node()
        while len(self.nodes) > target:
            self.stop_node(self.nodes[max(self.nodes)])

    def close(self) -> None:
        """Stop every node (in parallel: each drains), then Redis and etcd."""
        nodes = list(self.nodes.values())
        self.nodes.clear()
        for node in nodes:
            if node.process.poll() is None:
                node.process.terminate()
        for node in nodes:
            stop_process(node.process, STOP_TIMEOUT_S)
        for server in reversed(self._servers):
            server.stop(STOP_TIMEOUT_S)
        self._servers.clear()
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- following the decisions -------------------------------------------------------

    async def follow(self, stop: asyncio.Event) -> None:
        """Match the node count to each new decision until ``stop`` is set."""
        from agentd.cluster.coordinator import ClusterKeys, parse_decision
        from agentd.cluster.etcd import EtcdClient
        from agentd.errors import Unavailable

        key = ClusterKeys(self.cluster).decision
        seen = 0
        async with EtcdClient(self.etcd_url) as client:
            while not stop.is_set():
                self.reap()
                try:
                    got = await client.get(key)
                except Unavailable as error:
                    self.say(f"warning: {error}")
                    got = None
                if got is not None and got[1] != seen:
                    seen = got[1]
                    try:
                        decision = parse_decision(got[0])
                    except ValueError as error:
                        self.say(f"warning: ignoring a malformed decision: {error}")
                    else:
                        if decision["desired"] != len(self.nodes):
                            self.say(
                                f"decision: {decision['desired']} nodes ({decision['reason']}; "
                                f"within {self.min_nodes}..{self.max_nodes})"
                            )
                        self.scale_to(decision["desired"])
                if len(self.nodes) < self.min_nodes:  # crashed below the floor
                    self.scale_to(self.min_nodes)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), POLL_S)


def run_up(*, nodes: int, min_nodes: int, max_nodes: int, base_port: int, cluster: str) -> None:
    """Run a local cluster until SIGINT or SIGTERM; UpError if it cannot start."""
    local = LocalCluster(
        nodes=nodes,
        min_nodes=min_nodes,
        max_nodes=max_nodes,
        base_port=base_port,
        cluster=cluster,
    )

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        local.start_servers()
        for _ in range(nodes):
            local.start_node()
        local.say(
            f"cluster {cluster}: {nodes} nodes (scaling within {min_nodes}..{max_nodes}); "
            f"agentd cluster status --etcd {local.etcd_url} --cluster {cluster}; Ctrl-C stops all"
        )
        await local.follow(stop)
        local.say("stopping")

    try:
        asyncio.run(main())
    finally:
        local.close()
