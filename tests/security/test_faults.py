"""Faults against a live server: the state store's disk fills up; the server is killed.

Disk full is real: the server runs in its own mount namespace (``unshare``; as root
directly, otherwise inside a user namespace, which needs no privilege) with its state
database on a small tmpfs, which the test fills through ``/proc/PID/root``. Nothing is
mounted in the test's own namespace, so nothing is left mounted if the test dies.
"""

from __future__ import annotations

import concurrent.futures
import errno
import os
import shutil
import signal
import sqlite3
import threading
import time
from pathlib import Path

import grpc
import httpx
import orjson
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentd.testing import RunningServer, start_server
from agentd.v1 import agent_pb2 as pb
from agentd.v1 import agent_pb2_grpc as pb_grpc
from tests.conftest import PLUGINS, metric_value

# Runs in the new mount namespace: mount the tmpfs over the folder, then become the server.
_IN_NAMESPACE = 'mount -t tmpfs -o "size=$1" agentd-faults "$2" && shift 2 && exec "$@"'


def serve_on_small_disk(disk: Path, size: str, timeout: float = 60.0) -> RunningServer:
    """``agentd serve`` (the test agents) with its state on a ``size`` tmpfs at ``disk``,
    mounted in a mount namespace of its own."""
    disk.mkdir()
    unshare = shutil.which("unshare")
    assert unshare is not None, "util-linux's unshare is needed for the disk-full test"
    command = [unshare, "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        command += ["--user", "--map-root-user"]  # unprivileged: a user namespace
    command += ["sh", "-c", _IN_NAMESPACE, "sh", size, str(disk)]
    return start_server(
        ["--plugins", str(PLUGINS)],
        env={"AGENTD_STATE_PATH": str(disk / "agents.db")},
        timeout=timeout,
        wrapper=command,
    )


def fill(folder: Path) -> Path:
    """Write a file in ``folder`` until its file system has no space left."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    chunk = b"\0" * 65536
    try:
        while True:
            os.write(fd, chunk)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    return filler


class Caller:
    """Calls one counter agent over and over, alternating gRPC and Connect JSON, and keeps
    what each call answered: the count, or the error status."""

    def __init__(self, server: RunningServer, channel: grpc.Channel, agent: str) -> None:
        self.agent = agent
        self._stub = pb_grpc.AgentServiceStub(channel)
        self._http = httpx.Client(base_url=server.url, timeout=30)
        self._calls = 0
        self.counts: list[int] = []  # the answers of the calls that succeeded, in order
        self.failures: list[str] = []  # "UNAVAILABLE: ..." / "503: ..."

    def call(self) -> None:
        self._calls += 1
        if self._calls % 2:
            try:
                reply = self._stub.Invoke(
                    pb.InvokeRequest(agent=self.agent, message=pb.Message()), timeout=30
                )
                self.counts.append(int(reply.message.text))
            except grpc.RpcError as exc:
                self.failures.append(f"{exc.code().name}: {exc.details()}")
        else:
            r = self._http.post(
                "/agentd.v1.AgentService/Invoke",
                content=orjson.dumps({"agent": self.agent, "message": {}}),
                headers={"content-type": "application/json"},
            )
            if r.status_code == 200:
                self.counts.append(int(r.json()["message"]["text"]))
            else:
                self.failures.append(f"{r.status_code}: {r.text}")

    def close(self) -> None:
        self._http.close()


def run_calls(callers: list[Caller], per_caller: int) -> None:
    """Each caller makes ``per_caller`` calls one after another; callers run at once."""
    with concurrent.futures.ThreadPoolExecutor(len(callers)) as pool:
        list(pool.map(lambda c: [c.call() for _ in range(per_caller)], callers))


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health(channel: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status


def stored_counts(database: Path) -> dict[str, int]:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT address, state FROM agent_state").fetchall()
    db.close()
    return {address: orjson.loads(state)["seen"] for address, state in rows}


def test_disk_full_fails_calls_cleanly_and_counts_nothing_twice(tmp_path):
    server = serve_on_small_disk(tmp_path / "disk", "1m")
    try:
        # The server's view of the folder: the tmpfs is mounted only in its namespace.
        disk = Path(f"/proc/{server.process.pid}/root") / (tmp_path / "disk").relative_to("/")
        with (
            grpc.insecure_channel(server.target) as channel,
            httpx.Client(base_url=server.url, timeout=30) as http,
        ):
            callers = [Caller(server, channel, f"counter/full-{i}") for i in range(4)]
            run_calls(callers, 2)
            assert all(c.counts == [1, 2] for c in callers), [c.failures for c in callers]
            assert http.get("/readyz").status_code == 200

            filler = fill(disk)
            run_calls(callers, 15)
            failures = [f for c in callers for f in c.failures]
            assert failures, "no call failed on a full disk: the test did not test anything"
            for failure in failures:
                # The caller hears that it failed, and why; never an internal error.
                assert failure.startswith(("UNAVAILABLE: ", "503: ")), failure
                assert "database or disk is full" in failure, failure
            ready = http.get("/readyz")
            assert ready.status_code == 503, ready.text
            assert "state store" in ready.text and "database or disk is full" in ready.text
            assert health(channel) == NOT_SERVING  # gRPC health of the whole node, too
            metrics = http.get("/metrics").text
            assert metric_value(metrics, "agentd_state_store_errors_total") > 0
            assert metric_value(metrics, "agentd_state_store_failing") == 1
            # Logged, but not a line per failed call: a full disk fails thousands a second.
            assert 1 <= server.log().count("state store commit failed") <= 3, server.log()

            filler.unlink()  # space again
            failed_so_far = [len(c.failures) for c in callers]
            run_calls(callers, 3)
            assert [len(c.failures) for c in callers] == failed_so_far, [
                c.failures[-3:] for c in callers
            ]
            assert http.get("/readyz").status_code == 200
            assert health(channel) == SERVING
            assert metric_value(http.get("/metrics").text, "agentd_state_store_failing") == 0

            for caller in callers:
                # Every success counted once and no failure counted: 1, 2, 3, ... in order.
                assert caller.counts == list(range(1, len(caller.counts) + 1)), caller.counts
                caller.close()
            # What the store holds is what the last call acknowledged, not more. (SQLite
            # resolves /proc/PID/root to this namespace's "/": read a copy, taken while
            # nothing writes.)
            copy = tmp_path / "copy"
            copy.mkdir()
            for name in ("agents.db", "agents.db-wal"):
                shutil.copyfile(disk / name, copy / name)
            stored = stored_counts(copy / "agents.db")
            assert stored == {c.agent: len(c.counts) for c in callers}, stored
    finally:
        server.stop()


def server_pid(cli: RunningServer) -> int:
    """The process that runs the gateway (and its state store): ``agentd serve``'s Envoy."""
    children = Path(f"/proc/{cli.process.pid}/task/{cli.process.pid}/children").read_text()
    pids = [int(p) for p in children.split()]
    assert len(pids) == 1, pids
    return pids[0]


def test_kill_9_under_load_loses_no_acknowledged_state(tmp_path):
    database = tmp_path / "agents.db"
    env = {"AGENTD_STATE_PATH": str(database)}
    server = start_server(["--plugins", str(PLUGINS)], env=env)
    acked: dict[str, int] = {}
    stop = threading.Event()
    lock = threading.Lock()
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.AgentServiceStub(channel)

            def load(agent: str) -> None:
                while not stop.is_set():
                    try:
                        reply = stub.Invoke(
                            pb.InvokeRequest(agent=agent, message=pb.Message()), timeout=10
                        )
                    except grpc.RpcError:
                        continue  # the server is gone: only acknowledged calls count
                    with lock:
                        acked[agent] = max(acked.get(agent, 0), int(reply.message.text))

            agents = [f"counter/kill-{i}" for i in range(8)]
            threads = [threading.Thread(target=load, args=(a,)) for a in agents]
            for thread in threads:
                thread.start()
            time.sleep(3)  # bounded load, then the crash mid-write
            os.kill(server_pid(server), signal.SIGKILL)
            time.sleep(0.5)
            stop.set()
            for thread in threads:
                thread.join(30)
        assert sum(acked.values()) >= 100, f"too little load to test anything: {acked}"
    finally:
        stop.set()
        server.stop()

    with sqlite3.connect(database) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()
    stored = stored_counts(database)
    for agent, count in acked.items():
        # Every acknowledged call was committed before its reply was sent.
        assert stored.get(agent, 0) >= count, (agent, stored.get(agent), count)

    again = start_server(["--plugins", str(PLUGINS)], env=env)
    try:
        with grpc.insecure_channel(again.target) as channel:
            stub = pb_grpc.AgentServiceStub(channel)
            for agent in acked:
                reply = stub.Invoke(pb.InvokeRequest(agent=agent, message=pb.Message()))
                assert int(reply.message.text) == stored[agent] + 1
    finally:
        again.stop()


@pytest.fixture(autouse=True)
def _no_leftover_mounts(tmp_path):
    yield
    # The tmpfs lived in the server's namespace only: the test's own view has no mount.
    assert str(tmp_path) not in Path("/proc/self/mounts").read_text()
