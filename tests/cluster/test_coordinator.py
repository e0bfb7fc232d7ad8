"""The coordinator against a real etcd: one decision per revision when two coordinators
race, the election moves when the leader's lease ends, every node follows the decision
(agentd_cluster_desired_nodes), down zones are not counted, bad etcd data is ignored."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from prometheus_client import CollectorRegistry

from agentd.cluster.coordinator import ClusterKeys, Coordinator
from agentd.cluster.etcd import EtcdClient
from agentd.observability.cluster_metrics import ClusterMetrics
from agentd.settings import load_settings

KEYS = ClusterKeys("t")
WAIT_S = 20.0


def settings(node: str, **extra):
    values = {
        "cluster": "t",
        "node_id": node,
        "lease_ttl_s": 2.0,
        "scale_interval_s": 0.2,
        "target_utilization": 0.5,
        "min_nodes": 1,
        "max_nodes": 10,
        "scale_down_stabilization_s": 0.0,
    }
    values.update(extra)
    return load_settings(**values)


def status(node: str, load: float, zone: str = "z1", **extra) -> bytes:
    return json.dumps(
        {"id": node, "peer": "127.0.0.1:1", "zone": zone, "load": load, "version": 1, **extra}
    ).encode()


async def until(predicate, what: str, timeout: float = WAIT_S) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.05)


@pytest.fixture
async def client(etcd):
    async with EtcdClient(etcd.url) as client:
        yield client


async def decision_of(client: EtcdClient) -> dict | None:
    got = await client.get(KEYS.decision)
    return None if got is None else json.loads(got[0])


async def test_two_coordinators_on_the_same_revision_write_one_decision(client):
    for i, load in enumerate((0.75, 0.75, 0.75, 0.75)):
        await client.put(KEYS.nodes + f"n{i}", status(f"n{i}", load))
    first, second = Coordinator(settings("a"), client), Coordinator(settings("b"), client)
    # Both read the same state (no decision yet: revision 0), then both write.
    snapshots = [await first.read_snapshot(), await second.read_snapshot()]
    assert snapshots[0].mod_revision == snapshots[1].mod_revision == 0
    written = await asyncio.gather(
        first.write_decision(snapshots[0], first.decide(snapshots[0])),
        second.write_decision(snapshots[1], second.decide(snapshots[1])),
    )
    assert sum(w is not None for w in written) == 1
    winner, loser = (first, second) if written[0] is not None else (second, first)
    stored = await decision_of(client)
    assert stored["by"] == winner.node_id and stored["revision"] == 0
    assert (stored["desired"], stored["current"], stored["reason"]) == (6, 4, "scale_up")
    assert stored["signals"]["load"] == {"observed": 0.75, "target": 0.5, "ratio": 1.5}
    # The loser re-reads and writes after the winner's decision, naming its revision.
    _, winner_revision = await client.get(KEYS.decision)
    again = await loser.decide_once()
    assert again is not None and again["revision"] == winner_revision
    assert (await decision_of(client))["by"] == loser.node_id


async def test_racing_coordinators_write_exactly_one_decision_per_revision(client):
    await client.put(KEYS.nodes + "n0", status("n0", 0.5))
    coordinators = [Coordinator(settings(f"c{i}"), client) for i in range(3)]
    start = await client.revision()
    written = []
    for _ in range(8):  # rounds where all three read and write at once
        written += await asyncio.gather(*(c.decide_once(retries=0) for c in coordinators))
    successes = [w for w in written if w is not None]
    assert len(successes) >= 8  # at least one per round (the first to write)
    # Every write the key saw, in order: each replaced exactly the one before it.
    events = await client.watch_prefix(KEYS.decision, start + 1)
    seen = []
    async with asyncio.timeout(WAIT_S):
        async for event in events:
            seen.append((json.loads(event.value)["revision"], event.mod_revision))
            if len(seen) == len(successes):
                break
    await events.aclose()
    revisions = [replaced for replaced, _ in seen]
    assert len(set(revisions)) == len(revisions)  # one decision per revision
    assert revisions[0] == 0
    assert [r for r, _ in seen[1:]] == [m for _, m in seen[:-1]]


async def test_one_leader_and_the_election_moves_when_its_lease_is_revoked(client):
    await client.put(KEYS.nodes + "n0", status("n0", 0.5))
    nodes = [Coordinator(settings(name), client) for name in ("a", "b")]
    for node in nodes:
        await node.start()
    try:
        async with asyncio.timeout(WAIT_S):
            await asyncio.wait(
                [asyncio.create_task(n.wait_leading()) for n in nodes],
                return_when=asyncio.FIRST_COMPLETED,
            )
        await asyncio.sleep(0.5)  # the other has campaigned by now and lost
        leaders = [n for n in nodes if n.is_leader]
        assert len(leaders) == 1
        leader, other = leaders[0], next(n for n in nodes if n is not leaders[0])
        held = json.loads((await client.get(KEYS.coordinator))[0])
        assert held["id"] == leader.node_id

        async def decided_by(node) -> bool:
            decision = await decision_of(client)
            return decision is not None and decision["by"] == node.node_id

        await until(lambda: decided_by(leader), "the leader's decision")
        # The leader's lease ends behind its back (as when etcd expires it).
        await client.revoke_lease(held["lease"])
        await until(lambda: asyncio.sleep(0, other.is_leader), "the other leads")
        await until(lambda: decided_by(other), "the new leader's decision")
        held = json.loads((await client.get(KEYS.coordinator))[0])
        assert held["id"] == other.node_id
        # The old leader noticed (its keep-alive failed) and follows.
        await until(lambda: asyncio.sleep(0, not leader.is_leader), "the old leader steps down")
    finally:
        for node in nodes:
            await node.aclose()


async def test_a_closed_leader_hands_over_without_waiting_for_its_ttl(client):
    first = Coordinator(settings("a", lease_ttl_s=30.0), client)
    await first.start()
    await asyncio.wait_for(first.wait_leading(), WAIT_S)
    second = Coordinator(settings("b", lease_ttl_s=30.0), client)
    await second.start()
    try:
        await first.aclose()  # revokes its lease: the key goes now, not in 30 s
        await asyncio.wait_for(second.wait_leading(), 10.0)
    finally:
        await second.aclose()
    assert await client.get(KEYS.coordinator) is None


async def test_every_node_reports_the_decision_it_reads(client):
    for i in range(2):
        await client.put(KEYS.nodes + f"n{i}", status(f"n{i}", 1.0))
    registries = [CollectorRegistry(), CollectorRegistry()]
    nodes = [
        Coordinator(settings(f"n{i}"), client, ClusterMetrics(registries[i])) for i in range(2)
    ]
    for node in nodes:
        await node.start()
    try:

        async def everyone_knows() -> bool:
            values = [r.get_sample_value("agentd_cluster_desired_nodes") for r in registries]
            return values == [4.0, 4.0]  # 2 nodes at load 1.0 against 0.5: 4

        await until(everyone_knows, "both nodes report 4")
        leader = next(n for n in nodes if n.is_leader)
        index = nodes.index(leader)
        decisions = registries[index].get_sample_value(
            "agentd_cluster_scaling_decisions_total", {"reason": "scale_up"}
        )
        assert decisions >= 1
        for node in nodes:
            assert node.decision["desired"] == 4
    finally:
        for node in nodes:
            await node.aclose()


async def test_nodes_of_a_zone_marked_down_are_not_counted(client):
    await client.put(KEYS.nodes + "a1", status("a1", 0.5, zone="za"))
    await client.put(KEYS.nodes + "b1", status("b1", 0.0, zone="zb"))
    await client.put(KEYS.nodes + "b2", status("b2", 0.0, zone="zb"))
    coordinator = Coordinator(settings("a1"), client)
    before = await coordinator.decide_once()
    assert before["current"] == 3
    await client.put(KEYS.failover, json.dumps({"down": ["zb"]}).encode())
    after = await coordinator.decide_once()
    assert (after["current"], after["desired"], after["down_zones"]) == (1, 1, ["zb"])
    assert after["reason"] == "within_tolerance"


async def test_malformed_etcd_data_is_logged_and_ignored(client, caplog):
    caplog.set_level(logging.WARNING, logger="agentd.cluster.coordinator")
    await client.put(KEYS.nodes + "good", status("good", 0.5))
    for name, value in [
        ("notjson", b"{not json"),
        ("binary", b"\xff\xfe"),
        ("list", b"[1, 2]"),
        ("noid", b'{"load": 0.5}'),
        ("badload", status("badload", 7.0)),
    ]:
        await client.put(KEYS.nodes + name, value)
    await client.put(KEYS.failover, b'{"down": "zb"}')
    await client.put(KEYS.decision, b"garbage")
    _, garbage_revision = await client.get(KEYS.decision)
    registry = CollectorRegistry()
    coordinator = Coordinator(settings("good"), client, ClusterMetrics(registry))
    written = await coordinator.decide_once()
    # Only the good status counts; the garbage decision is replaced, naming its revision.
    assert (written["current"], written["desired"]) == (1, 1)
    assert written["revision"] == garbage_revision and written["down_zones"] == []
    logged = caplog.text
    for name in ("notjson", "binary", "list", "noid", "badload", "failover", "horizontal"):
        assert name in logged, name
    # A second round logs nothing new about the same data.
    caplog.clear()
    await coordinator.decide_once()
    assert "notjson" not in caplog.text

    # Running: garbage written over the decision is ignored by the follower (the last
    # good decision stays in force) and replaced by the leader's next decision.
    await coordinator.start()
    try:
        await asyncio.wait_for(coordinator.wait_leading(), WAIT_S)
        await until(lambda: asyncio.sleep(0, coordinator.decision is not None), "followed")
        caplog.clear()
        await client.put(KEYS.decision, b'{"desired": "many"}')
        _, garbage_revision = await client.get(KEYS.decision)

        async def replaced() -> bool:
            decision = await decision_of(client)
            return isinstance(decision.get("desired"), int) and decision["revision"] == (
                garbage_revision
            )

        await until(replaced, "the leader replaced the garbage")
        assert coordinator.decision["desired"] == 1
        assert registry.get_sample_value("agentd_cluster_desired_nodes") == 1
        assert "desired must be a non-negative integer" in caplog.text
    finally:
        await coordinator.aclose()


async def test_a_new_leader_keeps_the_last_leaders_stabilisation_window(client):
    for i in range(4):
        await client.put(KEYS.nodes + f"n{i}", status(f"n{i}", 0.5))
    first = Coordinator(settings("a", scale_down_stabilization_s=600.0), client)
    assert (await first.decide_once())["desired"] == 4
    for i in range(4):  # the load falls away
        await client.put(KEYS.nodes + f"n{i}", status(f"n{i}", 0.05))
    second = Coordinator(settings("b", scale_down_stabilization_s=600.0), client)
    decision = await second.decide_once()
    # Raw: 1 node; the window still holds the first leader's 4.
    assert (decision["recommendation"], decision["desired"]) == (1, 4)
    assert decision["reason"] == "stabilizing"
    no_window = Coordinator(settings("c", scale_down_stabilization_s=0.0), client)
    assert (await no_window.decide_once())["desired"] == 1
