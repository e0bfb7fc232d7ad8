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
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from agentd.cluster.supervisor import die_with_parent

__all__ = ["LocalCluster", "UpError"]

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 15.0
POLL_S = 1.0


class UpError(Exception):
    """A local cluster could not start (message for one line; exit 1)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_listening(process: subprocess.Popen[bytes], port: int, log: Path, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise UpError(f"{what} exited at start: {tail[0][:300]} (log: {log})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise UpError(f"{what} is not listening on 127.0.0.1:{port} after {START_TIMEOUT_S:g}s")


def _stop(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; by this process's own PID only."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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
        self._servers: list[subprocess.Popen[bytes]] = []

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    # -- etcd and Redis ----------------------------------------------------------------

    def start_servers(self) -> None:
        etcd = shutil.which("etcd")
        if etcd is None:
            raise UpError("etcd is not installed (on Debian: apt-get install etcd-server)")
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        self._server(
            "etcd",
            [
                etcd,
                "--name=agentd-dev",
                f"--data-dir={self.folder / 'etcd'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=agentd-dev=http://127.0.0.1:{peer}",
                "--log-level=error",
            ],
            client,
        )
        self.say(f"etcd:  {self.etcd_url}")
        redis = shutil.which("redis-server")
        if redis is None:
            self.say("redis: not installed; the nodes share a SQLite file")
            return
        port = free_port()
        self._server(
            "redis",
            [
                *(redis, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(self.folder)),
                *("--save", "", "--appendonly", "no"),
            ],
            port,
        )
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        self.say(f"redis: {self.redis_url} (state store)")

    def _server(self, what: str, argv: list[str], port: int) -> None:
        log = self.folder / f"{what}.log"
        with log.open("wb") as output:
            process = subprocess.Popen(
                argv,
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches us; we stop it after the nodes
                preexec_fn=die_with_parent(),  # and it goes with us, even on SIGKILL
            )
        self._servers.append(process)
        _wait_listening(process, port, log, what)

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
        with log.open("wb") as output:
            process = subprocess.Popen(
                argv,
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        node = Node(index, port, peer, log, process)
        self.nodes[index] = node
        self.say(
            f"node {node.id}: http://127.0.0.1:{port} (peer 127.0.0.1:{peer}, pid "
            f"{process.pid}, log {log})"
        )
        return node

    def stop_node(self, node: Node) -> None:
        self.nodes.pop(node.index, None)
        _stop(node.process)
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
            _stop(node.process)
        for process in reversed(self._servers):
            _stop(process)
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
