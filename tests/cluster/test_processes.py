"""``agentd serve --processes N``: the supervisor's restart rule (a fake clock and children)
and, with real servers started here, N processes on one port."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from openai import OpenAI

from agentd.cluster.supervisor import Supervisor, die_with_parent, local_peers
from agentd.testing import RunningServer, start_server
from agentd.v1 import agent_pb2 as pb
from agentd.v1 import agent_pb2_grpc

# -- the supervisor's rule, without processes ------------------------------------------------


class FakeChild:
    def __init__(self, name: str) -> None:
        self.name = name
        self.pid: int | None = 100
        self.status: int | None = None
        self.starts = 0
        self.kills = 0
        self.fail_starts = 0

    def start(self) -> None:
        if self.fail_starts:
            self.fail_starts -= 1
            raise RuntimeError("no room")
        self.starts += 1
        self.pid = 100 + self.starts
        self.status = None

    def poll(self) -> int | None:
        return self.status

    def kill(self) -> None:
        self.kills += 1


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_an_exited_child_is_restarted_with_its_identity_after_a_backoff():
    clock, lines = Clock(), []
    a, b = FakeChild("p0"), FakeChild("p1")
    supervisor = Supervisor([a, b], log=lines.append, clock=clock)
    supervisor.check()
    assert lines == []
    b.status = -signal.SIGKILL
    supervisor.check()
    assert lines == ["process p1 (pid 100) exited with signal SIGKILL; restarting it in 0.5s"]
    assert b.kills == 1 and b.starts == 0  # reaped, waits for its backoff
    clock.now = 0.6
    supervisor.check()
    assert b.starts == 1 and a.starts == 0
    assert lines[-1] == "process p1 restarted (pid 101)"
    assert supervisor.restarts("p1") == 1
    # Crashing again at once: the wait doubles; after a stable run it is back to the least.
    b.status = 3
    clock.now = 1.0
    supervisor.check()
    assert lines[-1] == "process p1 (pid 101) exited with status 3; restarting it in 1s"
    clock.now = 2.0
    supervisor.check()
    assert b.starts == 2
    clock.now = 30.0
    b.status = 1
    supervisor.check()
    assert lines[-1].endswith("restarting it in 0.5s")


def test_a_failed_restart_is_tried_again_later_up_to_the_longest_wait():
    clock, lines = Clock(), []
    child = FakeChild("p0")
    supervisor = Supervisor([child], log=lines.append, clock=clock, max_backoff=2.0)
    child.status, child.fail_starts = 1, 3
    supervisor.check()
    waits = []
    for _ in range(4):
        clock.now += 5
        supervisor.check()
        waits.append(lines[-1])
    assert waits[:3] == [
        "process p0 failed to start again (no room); next try in 1s",
        "process p0 failed to start again (no room); next try in 2s",
        "process p0 failed to start again (no room); next try in 2s",
    ]
    assert waits[3] == "process p0 restarted (pid 101)"
    assert child.kills == 4  # the exit, then each failed start


def test_local_peers_are_private_sockets_with_fixed_ids():
    peers = local_peers(3)
    try:
        assert peers.ids == ("p0", "p1", "p2")
        assert os.stat(peers.run_dir).st_mode & 0o777 == 0o700
        assert peers.peers[1] == f"p1=unix:{peers.run_dir}/p1.sock"
        assert all(len(e) < 100 for e in peers.endpoints)  # fits a Unix socket path
    finally:
        peers.remove()
    assert not os.path.exists(peers.run_dir)


def test_a_child_dies_with_the_process_that_started_it():
    # A parent that starts a long sleep with die_with_parent, prints its pid and is killed
    # with SIGKILL: the sleep gets SIGTERM.
    code = (
        "import subprocess, sys, time\n"
        "from agentd.cluster.supervisor import die_with_parent\n"
        "child = subprocess.Popen(['sleep', '60'], preexec_fn=die_with_parent())\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    parent.stdout.close()
    end = time.monotonic() + 10
    while time.monotonic() < end and _alive(child):
        time.sleep(0.05)
    assert not _alive(child)
    assert callable(die_with_parent())


def _alive(pid: int) -> bool:
    # The sleep's parent is gone, so init reaps it; a zombie counts as dead.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


# -- agentd serve --processes 2, real servers ------------------------------------------------

PLUGINS = Path(__file__).parent.parent / "plugins"
_PROCESSES = re.compile(r"^processes: (.+)$", re.M)
_PID = re.compile(r"(p\d+) \(pid (\d+)\)")
_NODE = re.compile(r'^agentd_cluster_node\{node="([^"]+)"\} 1\.0$', re.M)


def serve_processes(*args: str, state: Path | None = None, count: int = 2) -> RunningServer:
    """``agentd serve --processes COUNT`` with the test agents; returns once every process
    serves (the supervisor names them after the banner)."""
    env = {"AGENTD_STATE_PATH": str(state)} if state is not None else None
    running = start_server(
        ["--processes", str(count), "--plugins", str(PLUGINS), *args], env=env, timeout=90
    )
    end = time.monotonic() + 30
    # One process prints no "processes:" line: its banner means it serves.
    while count > 1 and time.monotonic() < end and not _PROCESSES.search(running.log()):
        time.sleep(0.05)
    return running


def child_pids(running: RunningServer) -> dict[str, int]:
    match = _PROCESSES.search(running.log())
    assert match is not None, running.log()
    return {name: int(pid) for name, pid in _PID.findall(match[1])}


def answering_node(url: str) -> str:
    """The node id of the process that answers /metrics on a fresh connection."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    match = _NODE.search(text)
    assert match is not None, text[:500]
    return match[1]


def invoke(url: str, agent: str, text: str = "", timeout: float = 10) -> httpx.Response:
    """One JSON Invoke on a fresh connection (each can reach either process)."""
    return httpx.post(
        f"{url}/agentd.v1.AgentService/Invoke",
        json={"agent": agent, "message": {"text": text}},
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def two() -> Iterator[RunningServer]:
    running = serve_processes()
    yield running
    assert running.stop() == 0, running.log()


def test_what_was_loaded_is_printed_once_not_per_process(two):
    loaded = [line for line in two.log().splitlines() if line.startswith("loaded ")]
    assert len(loaded) == 1, two.log()
    assert " agent types (" in loaded[0] and " models (" in loaded[0]


def test_the_readme_examples_are_served_unchanged(two):
    url = two.url
    # Connect JSON over HTTP/1.1 and HTTP/2 (curl, as the README)
    body = '{"agent":"echo","message":{"text":"hello"}}'
    json_type = "content-type: application/json"
    for flags in ([], ["--http2-prior-knowledge"]):
        out = subprocess.run(
            [
                "curl",
                "-sS",
                *flags,
                f"{url}/agentd.v1.AgentService/Invoke",
                "-H",
                json_type,
                "-d",
                body,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert json.loads(out.stdout) == {"agent": "echo/default", "message": {"text": "hello"}}
    # gRPC with the grpcio stub
    with grpc.insecure_channel(two.target) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        reply = stub.Invoke(pb.InvokeRequest(agent="echo", message=pb.Message(text="hi")))
        assert reply.message.text == "hi"
    # OpenAI chat with the openai package
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(
        model="tinylm", messages=[{"role": "user", "content": "hello"}], max_tokens=4
    )
    assert chat.choices[0].message.content
    client.close()
    # KServe v2 REST infer
    features = [0.9, 0.8, 0.1, 0.5, 0.2, 0.7, 0.3, 0.4, 0.6, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    body = {
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 16], "data": features}]
    }
    infer = httpx.post(f"{url}/v2/models/decision/infer", json=body, timeout=30)
    assert infer.status_code == 200, infer.text
    assert {o["name"] for o in infer.json()["outputs"]} >= {"action"}


def test_both_processes_answer_on_the_one_port(two):
    seen = {answering_node(two.url) for _ in range(40)}
    assert seen == {"p0", "p1"}


def test_an_agents_state_is_one_across_processes(two):
    # Fresh connections land on either process; the agent lives on its owner only.
    replies = [invoke(two.url, "counter/shared-40").json()["message"]["text"] for _ in range(40)]
    assert replies == [str(n) for n in range(1, 41)]


def test_an_unrelated_serve_on_the_port_is_refused(two, tmp_path):
    for extra in ([], ["--processes", "2"]):
        out = subprocess.run(
            [sys.executable, "-m", "agentd", "serve", "--port", str(two.port), *extra],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "200", "AGENTD_STATE_PATH": str(tmp_path / "b.db")},
        )
        assert out.returncode == 1, out.stdout + out.stderr
        assert f"error: port {two.port} is in use" in out.stdout, out.stdout
    assert {answering_node(two.url) for _ in range(20)} == {"p0", "p1"}


def test_a_killed_process_is_restarted_with_its_identity(tmp_path):
    running = serve_processes(state=tmp_path / "agents.db")
    try:
        pids = child_pids(running)
        outcomes: list[bool] = []
        failures: list[str] = []
        stop = threading.Event()

        def load() -> None:  # a small load: one caller, fresh connections
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    reply = invoke(running.url, f"counter/k{n % 16}")
                except httpx.HTTPError as exc:
                    failures.append(type(exc).__name__)
                    outcomes.append(False)
                    continue
                outcomes.append(reply.status_code == 200)
                if reply.status_code != 200:
                    failures.append(f"{reply.status_code} {reply.text}")

        caller = threading.Thread(target=load)
        caller.start()
        time.sleep(1)
        os.kill(pids["p1"], signal.SIGKILL)
        end = time.monotonic() + 60
        while time.monotonic() < end and "process p1 restarted" not in running.log():
            time.sleep(0.1)
        restarted = re.search(r"process p1 restarted \(pid (\d+)\)", running.log())
        assert restarted is not None, running.log()
        assert f"process p1 (pid {pids['p1']}) exited with signal SIGKILL" in running.log()
        after = len(outcomes)
        time.sleep(1.5)
        stop.set()
        caller.join(30)
        # Calls succeed again once it is back, and it answers as p1 on the port.
        assert outcomes[after:] and all(outcomes[after:]), outcomes[after:]
        assert {answering_node(running.url) for _ in range(30)} == {"p0", "p1"}
        assert int(restarted[1]) != pids["p1"]
        # Failed: only the call in flight on the killed process (one caller: at most one),
        # its connection reset or, forwarded from p0, UNAVAILABLE with a retry hint. Calls
        # for its agents that arrive at p0 while it restarts wait for it (they never left).
        assert len(failures) <= 1, failures
        assert all(
            f.startswith(("Remote", "Read"))
            or (f.startswith("503 ") and "unreachable" in f and "retry" in f)
            for f in failures
        ), failures
    finally:
        assert running.stop() == 0, running.log()


def test_state_survives_a_change_of_processes(tmp_path):
    state = tmp_path / "agents.db"
    counts = []
    for count in (2, 1, 2):
        running = serve_processes(state=state, count=count)
        try:
            for _ in range(5):
                counts.append(int(invoke(running.url, "counter/kept").json()["message"]["text"]))
        finally:
            assert running.stop() == 0, running.log()
    assert counts == list(range(1, 16))


def test_serve_killed_leaves_no_process_and_a_stop_removes_the_run_folder():
    running = serve_processes()
    pids = child_pids(running)
    settings = _settings_of(pids["p0"])
    run_dir = Path(settings["peer_listen"].removeprefix("unix:")).parent
    assert run_dir.is_dir() and settings["peers"] == [
        f"p0=unix:{run_dir}/p0.sock",
        f"p1=unix:{run_dir}/p1.sock",
    ]
    assert running.stop() == 0
    assert "stopped" in running.log() and not run_dir.exists()
    assert not any(_alive(pid) for pid in pids.values())

    running = serve_processes()
    pids = child_pids(running)
    running.process.kill()  # SIGKILL: nothing of serve runs to stop them
    running.stop()
    end = time.monotonic() + 30
    while time.monotonic() < end and any(_alive(pid) for pid in pids.values()):
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids.values())


def _settings_of(pid: int) -> dict:
    """The settings serve handed to one of its Envoys (its environment)."""
    with open(f"/proc/{pid}/environ", "rb") as environ:
        variables = dict(
            entry.split(b"=", 1) for entry in environ.read().split(b"\0") if b"=" in entry
        )
    return json.loads(variables[b"AGENTD_SERVE_SETTINGS"])
