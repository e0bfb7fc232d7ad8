"""``agentd serve --processes N``: the supervisor's restart rule (a fake clock and children)
and, with real servers started here, N processes on one port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from agentd.cluster.supervisor import Supervisor, die_with_parent, local_peers

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
