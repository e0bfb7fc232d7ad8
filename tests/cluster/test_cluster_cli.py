"""``agentd cluster status`` and ``failover`` against a real etcd holding a hand-made
cluster: the JSON and the table show nodes, leases, partitions per node, the coordinator,
the decision and the down zones; garbage in etcd is listed and skipped; etcd unreachable or
a bad flag is one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agentd.cluster.coordinator import ClusterKeys
from agentd.cluster.etcd import EtcdClient

KEYS = ClusterKeys("dev")


def agentd(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")}
    return subprocess.run(
        [sys.executable, "-m", "agentd", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**env, "COLUMNS": "200"},
    )


def node(node_id: str, zone: str, load: float, lease: int, **extra) -> bytes:
    return json.dumps(
        {
            "id": node_id,
            "peer": f"127.0.0.1:70{node_id[-1]}0",
            "zone": zone,
            "load": load,
            "run_queue": 3,
            "active_agents": 120,
            "tokens_per_s": 0.0,
            "kv_blocks_used": 0,
            "kv_blocks_total": 0,
            "queue_time_s": 0.01,
            "partitions": [],
            "lease": lease,
            "started_at": 1.0,
            "version": 1,
            **extra,
        }
    ).encode()


async def _populate(url: str, garbage: bool) -> None:
    async with EtcdClient(url) as client:
        leases = [await client.grant_lease(60), await client.grant_lease(60)]
        await client.put(KEYS.nodes + "n1", node("n1", "za", 0.25, leases[0].id), leases[0])
        await client.put(KEYS.nodes + "n2", node("n2", "zb", 0.75, leases[1].id), leases[1])
        for p in range(6):  # 6 of 8 partitions owned: n1 4, n2 1, a gone node 1
            owner = "n1" if p < 4 else "n2" if p == 4 else "n9"
            await client.put(KEYS.partitions + str(p), owner.encode())
        await client.put(KEYS.coordinator, json.dumps({"id": "n1", "lease": leases[0].id}).encode())
        decision = {
            "desired": 3,
            "current": 2,
            "reason": "scale_up",
            "signals": {},
            "revision": 0,
            "by": "n1",
            "at": 1.0,
        }
        await client.put(KEYS.decision, json.dumps(decision).encode())
        await client.put(KEYS.failover, json.dumps({"down": ["zb"]}).encode())
        if garbage:
            await client.put(KEYS.nodes + "bad", b"{not json")
            await client.put(KEYS.nodes + "worse", b'{"id": "worse", "load": "high"}')
            await client.put(KEYS.partitions + "x", b"n1")
            await client.put(KEYS.partitions + "5000", b"n1")
        # Another cluster's keys are not this one's.
        await client.put("/agentd/other/nodes/z", node("z", "za", 0.1, 0))


def status_json(etcd, tmp_path) -> dict:
    out = agentd(
        "cluster", "status", "--etcd", etcd.url, "--cluster", "dev", "--json", cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_status_as_json(etcd, tmp_path):
    asyncio.run(_populate(etcd.url, garbage=False))
    report = status_json(etcd, tmp_path)
    # The partition count is the settings' (AGENTD_PARTITIONS would change it); 1024 here.
    assert report["partitions"] == {
        "total": 1024,
        "owned": 6,
        "unowned": 1018,
        "owner_not_live": 1,
    }
    nodes = {row["id"]: row for row in report["nodes"]}
    assert set(nodes) == {"n1", "n2"}
    assert nodes["n1"]["partitions"] == 4 and nodes["n2"]["partitions"] == 1
    assert (nodes["n1"]["zone"], nodes["n1"]["load"], nodes["n1"]["run_queue"]) == ("za", 0.25, 3)
    assert nodes["n1"]["peer"] == "127.0.0.1:7010" and nodes["n1"]["active_agents"] == 120
    assert 50 <= nodes["n1"]["lease_ttl_s"] <= 60  # the lease's time left, asked of etcd
    assert (nodes["n1"]["zone_down"], nodes["n2"]["zone_down"]) == (False, True)
    assert report["coordinator"]["id"] == "n1"
    assert report["decision"]["desired"] == 3
    assert report["down_zones"] == ["zb"]
    assert report["ignored"] == []


def test_status_as_a_table(etcd, tmp_path):
    asyncio.run(_populate(etcd.url, garbage=False))
    out = agentd("cluster", "status", "--etcd", etcd.url, "--cluster", "dev", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "2 nodes, 6/1024 partitions owned, 1018 unowned" in lines[0]
    row = next(line for line in lines if line.startswith("n1 "))
    assert row.split()[:7] == ["n1", "za", "127.0.0.1:7010", "0.25", "3", "120", row.split()[6]]
    assert row.split()[-1] == "4" and row.split()[6].endswith("s")
    assert "zb (down)" in next(line for line in lines if line.startswith("n2 "))
    assert "coordinator: n1" in out.stdout
    assert "scaling: desired 3 nodes (current 2, scale_up) by n1" in out.stdout
    assert "zones down: zb" in out.stdout
    assert "partitions owned by no live node: 1" in out.stdout


def test_garbage_in_etcd_is_listed_and_skipped(etcd, tmp_path):
    asyncio.run(_populate(etcd.url, garbage=True))
    report = status_json(etcd, tmp_path)
    assert {row["id"] for row in report["nodes"]} == {"n1", "n2"}
    assert report["partitions"]["owned"] == 6
    ignored = {item["key"]: item["error"] for item in report["ignored"]}
    assert set(ignored) == {
        KEYS.nodes + "bad",
        KEYS.nodes + "worse",
        KEYS.partitions + "x",
        KEYS.partitions + "5000",
    }
    assert "load" in ignored[KEYS.nodes + "worse"]
    out = agentd("cluster", "status", "--etcd", etcd.url, "--cluster", "dev", cwd=tmp_path)
    assert out.returncode == 0 and f"ignored {KEYS.nodes}bad" in out.stdout


def test_an_empty_cluster(etcd, tmp_path):
    report = status_json(etcd, tmp_path)
    assert report["nodes"] == [] and report["coordinator"] is None and report["decision"] is None
    out = agentd("cluster", "status", "--etcd", etcd.url, cwd=tmp_path)
    assert "0 nodes" in out.stdout and "no decision yet" in out.stdout


def test_failover_marks_and_clears_zones(etcd, tmp_path):
    base = ("cluster", "failover", "--etcd", etcd.url, "--cluster", "dev")
    for zone, expected in (("zb", "zones down: zb"), ("za", "zones down: za, zb")):
        out = agentd(*base, "--zone", zone, cwd=tmp_path)
        assert (out.returncode, out.stdout.strip()) == (0, expected), out.stderr
    assert status_json(etcd, tmp_path)["down_zones"] == ["za", "zb"]
    out = agentd(*base, "--zone", "zb", "--clear", cwd=tmp_path)
    assert out.stdout.strip() == "zones down: za"
    out = agentd(*base, "--zone", "zc", "--clear", cwd=tmp_path)  # not down: nothing to do
    assert out.stdout.strip() == "zones down: za"


def test_failover_replaces_a_malformed_marker_with_a_warning(etcd, tmp_path):
    async def put() -> None:
        async with EtcdClient(etcd.url) as client:
            await client.put(KEYS.failover, b"[oops")

    asyncio.run(put())
    out = agentd(
        "cluster", "failover", "--etcd", etcd.url, "--cluster", "dev", "--zone", "za", cwd=tmp_path
    )
    assert out.returncode == 0 and out.stdout.strip() == "zones down: za"
    assert "warning: replacing a malformed" in out.stderr


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["status", "--etcd", "http://127.0.0.1:{port}"], 1, "did not answer"),
        (["status", "--json", "--etcd", "http://127.0.0.1:{port}"], 1, "is etcd running?"),
        (["failover", "--zone", "za", "--etcd", "http://127.0.0.1:{port}"], 1, "did not answer"),
        (["status", "--etcd", "ftp://127.0.0.1:1"], 2, "only http:// is supported"),
        (["status", "--etcd", "127.0.0.1"], 2, "expected http://host:port"),
        (["status", "--cluster", "a b"], 2, "cluster: String should match pattern"),
        (["failover", "--zone", "a b"], 2, "a zone name is 1-63 letters"),
        (["failover", "--zone", ""], 2, "a zone name is 1-63 letters"),
        (["failover"], 2, "Missing option '--zone'"),
    ],
)
def test_errors_are_one_line_and_a_non_zero_exit(tmp_path, args, code, message):
    port = _closed_port()
    out = agentd("cluster", *(a.format(port=port) for a in args), cwd=tmp_path, timeout=30)
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    assert message in out.stderr, out.stderr
    if code == 1:
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert out.stdout == ""


# --- agentd cluster up ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nodes", "0"], "--nodes 0: between 1 and 64"),
        (["--nodes", "2", "--min", "3", "--max", "2"], "expected 1 <= min <= max <= 64"),
        (["--nodes", "5", "--max", "4"], "--nodes 5 is outside --min 1 --max 4"),
        (["--nodes", "2", "--base-port", "65535"], "--base-port 65535: ports 65535..65538"),
        (["--cluster", "no way"], "--cluster 'no way'"),
    ],
)
def test_up_refuses_bad_flags(tmp_path, args, message):
    out = agentd("cluster", "up", *args, cwd=tmp_path)
    assert "Traceback" not in out.stderr
    assert out.returncode == 2 and message in out.stderr, (out.returncode, out.stderr)


def test_up_without_etcd_installed_is_one_line(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    out = subprocess.run(
        [sys.executable, "-m", "agentd", "cluster", "up", "--nodes", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={"PATH": str(empty), "HOME": str(tmp_path)},
    )
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert (
        out.stderr.strip()
        == "error: etcd is not installed (on Debian: apt-get install etcd-server)"
    )


def test_up_starts_nodes_follows_decisions_and_stops_everything(tmp_path):
    """One node, scaled to two and back to one by decisions written to its etcd, then
    SIGTERM: every process it started is gone."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")}
    # A coordinator decides once when it leads, then not for an hour: the decisions this
    # test writes are the ones in force.
    env |= {"COLUMNS": "200", "AGENTD_SCALE_INTERVAL_S": "3600", "PYTHONUNBUFFERED": "1"}
    base = _closed_port()
    log = (tmp_path / "up.out").open("w+")
    argv = ["cluster", "up", "--nodes", "1", "--max", "2", "--base-port", str(base)]
    up = subprocess.Popen(
        [sys.executable, "-m", "agentd", *argv, "--cluster", "dev"],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        env=env,
    )
    try:
        url = _wait_for_line(tmp_path / "up.out", "etcd:  ", up).split()[-1]

        async def drive() -> None:
            async with EtcdClient(url) as client:
                await _until_nodes(client, {"n0"})
                # n0 stands as coordinator and decides once when it leads: wait for that
                # decision, or it could land after (and overrule) the ones written below.
                await _until(lambda: client.get(KEYS.decision), "the first decision")
                for desired, expected in ((2, {"n0", "n1"}), (1, {"n0"})):
                    decision = {
                        "desired": desired,
                        "current": 1,
                        "reason": "test",
                        "revision": 0,
                        "by": "test",
                        "at": 1.0,
                    }
                    await client.put(KEYS.decision, json.dumps(decision).encode())
                    await _until_nodes(client, expected)

        try:
            asyncio.run(drive())
        except TimeoutError as error:
            raise AssertionError(
                f"{error}; up printed: {(tmp_path / 'up.out').read_text()}"
            ) from None
        _wait_for_line(tmp_path / "up.out", "node n1: stopped", up)
        assert f"node n1: http://127.0.0.1:{base + 1}" in (tmp_path / "up.out").read_text()
        up.send_signal(15)
        assert up.wait(60) == 0
    finally:
        if up.poll() is None:  # SIGTERM first: up stops what it started (a kill would not)
            up.terminate()
            try:
                up.wait(60)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait()
        log.close()
    text = (tmp_path / "up.out").read_text()
    pids = [
        int(line.split("pid ")[1].split(",")[0]) for line in text.splitlines() if "pid " in line
    ]
    assert len(pids) == 2  # n0, then n1
    for pid in pids:  # stopped and reaped by up
        assert not Path(f"/proc/{pid}").exists(), pid
    with socket.socket() as sock:  # nothing listens on n0's port (TIME_WAIT may remain)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", base))


def _wait_for_line(path: Path, prefix: str, process: subprocess.Popen, timeout: float = 60) -> str:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in path.read_text().splitlines():
            if line.startswith(prefix):
                return line
        if process.poll() is not None:
            raise AssertionError(f"up exited: {path.read_text()}")
        time.sleep(0.1)
    raise AssertionError(f"no {prefix!r} line: {path.read_text()}")


async def _until(read, what: str, timeout: float = 90.0):
    try:
        async with asyncio.timeout(timeout):
            while not (value := await read()):
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise TimeoutError(f"no {what} within {timeout:.0f} s") from None
    return value


async def _until_nodes(client: EtcdClient, expected: set[str]) -> None:
    async def ids() -> bool:
        items, _ = await client.get_prefix(KEYS.nodes)
        return {item.key.removeprefix(KEYS.nodes) for item in items} == expected

    await _until(ids, f"nodes {expected}")


def _descendants(pid: int) -> list[int]:
    found, stack = [], [pid]
    while stack:
        parent = stack.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            stack += children
    return found


def test_up_killed_with_sigkill_leaves_nothing_running(tmp_path):
    """etcd, Redis and the nodes run in their own sessions (Ctrl-C reaches only up), so
    only the kernel's parent-death signal stops them when up cannot."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")}
    env |= {"COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    log = (tmp_path / "up.out").open("w+")
    argv = ["cluster", "up", "--nodes", "1", "--base-port", str(_closed_port())]
    up = subprocess.Popen(
        [sys.executable, "-m", "agentd", *argv, "--cluster", "killed"],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        env=env,
    )
    try:
        _wait_for_line(tmp_path / "up.out", "node n0: http", up)
        family = _descendants(up.pid)
        assert len(family) >= 2, family  # etcd and the node at least
    finally:
        up.kill()
        up.wait()
        log.close()
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_running(pid) for pid in family):
        time.sleep(0.1)
    assert not [pid for pid in family if _running(pid)], (tmp_path / "up.out").read_text()


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
