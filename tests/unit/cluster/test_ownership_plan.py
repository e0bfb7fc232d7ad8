"""The ownership plan, without etcd: balanced, the same for every node that sees the same
members, stable under a restart, and moving little when a node joins or leaves."""

from __future__ import annotations

from agentd.cluster.ownership import UNOWNED, plan_for, plan_owners


def _counts(owners: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for owner in owners:
        counts[owner] = counts.get(owner, 0) + 1
    return counts


def test_shares_differ_by_at_most_one() -> None:
    for partitions in (1, 7, 64, 1024):
        for n in range(1, 6):
            nodes = [f"node-{i}" for i in range(n)]
            counts = _counts(plan_owners(partitions, nodes))
            assert sum(counts.values()) == partitions
            assert set(counts) <= set(nodes)
            if partitions >= n:
                assert max(counts.values()) - min(counts.values()) <= 1
                assert len(counts) == n


def test_the_plan_depends_only_on_the_set_of_nodes() -> None:
    assert plan_owners(256, ["a", "b", "c"]) == plan_owners(256, ["c", "a", "b", "a"])
    # a restart with the same id gives the same placement
    before = plan_owners(256, ["a", "b", "c"])
    assert plan_owners(256, ["a", "b"]) != before
    assert plan_owners(256, ["a", "b", "c"]) == before


def test_a_joining_node_takes_about_its_share_and_little_else_moves() -> None:
    before = plan_owners(1024, ["a", "b", "c"])
    after = plan_owners(1024, ["a", "b", "c", "d"])
    moved = [p for p in range(1024) if before[p] != after[p]]
    to_d = [p for p in moved if after[p] == "d"]
    assert len(to_d) == 256
    # Capacity limits cascade a little; most moves go to the new node.
    assert len(moved) < 1024 * 0.4


def test_no_eligible_node_plans_nothing() -> None:
    assert plan_owners(4, []) == [UNOWNED] * 4
    plan = plan_for("a", ["a", "a", UNOWNED, "b"], [UNOWNED] * 4)
    assert plan.idle


def test_a_node_claims_free_partitions_planned_for_it_and_hands_away_the_others() -> None:
    owners = ["a", "a", "a", UNOWNED, UNOWNED, "b"]
    desired = ["a", "c", "b", "a", "b", "a"]
    plan = plan_for("a", owners, desired)
    assert plan.claim == [3]
    assert plan.hand_over == {"c": [1], "b": [2]}
    # "a" does not take 5 from "b": b hands it over
    plan_b = plan_for("b", owners, desired)
    assert plan_b.claim == [4] and plan_b.hand_over == {"a": [5]}


def test_a_node_of_a_down_zone_hands_everything_away() -> None:
    owners = plan_owners(64, ["a", "b", "c"])
    desired = plan_owners(64, ["a", "b"])  # c's zone is down: not eligible
    plan = plan_for("c", owners, desired)
    assert plan.claim == []
    given = sorted(p for ps in plan.hand_over.values() for p in ps)
    assert given == [p for p in range(64) if owners[p] == "c"]
