"""The scaling rule (HPA-style, pure): ratios per signal, the tolerance band, the largest
proposal wins, scale-down stabilisation over a window, a limited scale-up step, min/max,
down zones, and node statuses refused with the field named."""

from __future__ import annotations

import math

import pytest

from agentd.cluster.scaling import (
    NodeStatus,
    Reason,
    ScalingPolicy,
    desired_nodes,
    parse_status,
    remember,
)

POLICY = ScalingPolicy(
    min_nodes=1,
    max_nodes=20,
    target_utilization=0.5,
    queue_time_target_s=1.0,
    kv_occupancy_target=0.8,
    tolerance=0.1,
    scale_down_stabilization_s=60.0,
    max_scale_up_factor=2.0,
)


def nodes(*loads: float, zone: str = "a", queue: float = 0.0, kv: tuple[int, int] = (0, 0)):
    return [
        NodeStatus(
            f"{zone}{i}",
            zone,
            load,
            queue_time_s=queue,
            kv_blocks_used=kv[0],
            kv_blocks_total=kv[1],
        )
        for i, load in enumerate(loads)
    ]


def test_load_above_target_scales_up_by_the_ratio():
    decision = desired_nodes(nodes(0.75, 0.75, 0.75, 0.75), POLICY)
    # ratio 0.75 / 0.5 = 1.5: ceil(4 * 1.5) = 6
    assert (decision.desired, decision.current, decision.reason) == (6, 4, Reason.SCALE_UP)
    assert decision.signals["load"].ratio == pytest.approx(1.5)
    assert decision.recommendation == 6


def test_within_the_tolerance_band_nothing_changes():
    for load in (0.455, 0.5, 0.545):  # ratios 0.91 .. 1.09
        decision = desired_nodes(nodes(load, load, load), POLICY)
        assert (decision.desired, decision.reason) == (3, Reason.WITHIN_TOLERANCE), load
    decision = desired_nodes(nodes(0.56, 0.56, 0.56), POLICY)  # ratio 1.12: out of the band
    assert (decision.desired, decision.reason) == (4, Reason.SCALE_UP)


def test_low_load_scales_down_without_history():
    decision = desired_nodes(nodes(0.1, 0.1, 0.1, 0.1), POLICY, history=(), now=100.0)
    # ratio 0.2: ceil(4 * 0.2) = 1
    assert (decision.desired, decision.reason) == (1, Reason.SCALE_DOWN)


def test_the_mean_load_of_the_nodes_is_the_signal():
    decision = desired_nodes(nodes(1.0, 0.0), POLICY)  # mean 0.5: on target
    assert decision.signals["load"].observed == pytest.approx(0.5)
    assert (decision.desired, decision.reason) == (2, Reason.WITHIN_TOLERANCE)


def test_queue_time_alone_scales_up():
    # Load on target, but turns wait 3 s against a 1 s target: ceil(2 * 3) = 6, limited to 4.
    decision = desired_nodes(nodes(0.5, 0.5, queue=3.0), POLICY)
    assert decision.signals["queue_time_s"].ratio == pytest.approx(3.0)
    assert decision.recommendation == 6
    assert (decision.desired, decision.reason) == (4, Reason.RATE_LIMITED)


def test_kv_occupancy_alone_scales_up_and_counts_only_nodes_with_a_cache():
    statuses = [*nodes(0.5, 0.5, kv=(95, 100)), NodeStatus("b0", "a", 0.5)]
    decision = desired_nodes(statuses, POLICY)
    # 190 of 200 blocks (the node without a cache adds none): 0.95 / 0.8 = 1.1875 -> ceil(3.5625)
    assert decision.signals["kv_occupancy"].observed == pytest.approx(0.95)
    assert (decision.desired, decision.reason) == (4, Reason.SCALE_UP)


def test_no_kv_cache_anywhere_means_no_kv_signal():
    decision = desired_nodes(nodes(0.5, 0.5), POLICY)
    assert set(decision.signals) == {"load", "queue_time_s"}


def test_the_largest_proposal_wins_so_one_busy_signal_blocks_a_scale_down():
    # Load says 1 node (ratio 0.2), the KV cache is on target: no scale-down.
    decision = desired_nodes(nodes(0.1, 0.1, 0.1, kv=(80, 100)), POLICY)
    assert (decision.desired, decision.reason) == (3, Reason.WITHIN_TOLERANCE)


def test_scale_down_takes_the_highest_recommendation_of_the_window():
    history = ((10.0, 5), (50.0, 4), (80.0, 2))
    decision = desired_nodes(nodes(0.1, 0.1, 0.1, 0.1, 0.1), POLICY, history, now=100.0)
    # Raw: ceil(5 * 0.2) = 1; the window (40..100] held 4 and 2 (10.0 fell out): 4.
    assert decision.recommendation == 1
    assert (decision.desired, decision.reason) == (4, Reason.STABILIZING)
    later = desired_nodes(nodes(0.1, 0.1, 0.1, 0.1, 0.1), POLICY, history, now=200.0)
    assert (later.desired, later.reason) == (1, Reason.SCALE_DOWN)  # the window has passed


def test_stabilisation_never_asks_for_more_than_the_current_count():
    history = ((90.0, 9),)
    decision = desired_nodes(nodes(0.1, 0.1, 0.1), POLICY, history, now=100.0)
    assert (decision.desired, decision.reason) == (3, Reason.STABILIZING)


def test_stabilisation_does_not_hold_back_a_scale_up():
    history = ((90.0, 1),)
    decision = desired_nodes(nodes(0.75, 0.75), POLICY, history, now=100.0)
    assert (decision.desired, decision.reason) == (3, Reason.SCALE_UP)


def test_a_zero_window_scales_down_at_once():
    policy = ScalingPolicy(target_utilization=0.5, scale_down_stabilization_s=0)
    decision = desired_nodes(nodes(0.1, 0.1, 0.1), policy, ((99.0, 3),), now=100.0)
    assert (decision.desired, decision.reason) == (1, Reason.SCALE_DOWN)


def test_scale_up_is_at_most_a_doubling_per_step_and_at_least_one_node():
    decision = desired_nodes(nodes(1.0, 1.0, 1.0), ScalingPolicy(target_utilization=0.1))
    assert decision.recommendation == 30
    assert (decision.desired, decision.reason) == (6, Reason.RATE_LIMITED)
    small = ScalingPolicy(target_utilization=0.5, max_scale_up_factor=1.01)
    decision = desired_nodes(nodes(1.0), small)
    assert decision.desired == 2  # ceil(1 * 1.01) = 2: a step may always add one node


def test_clamped_to_min_and_max():
    policy = ScalingPolicy(min_nodes=2, max_nodes=5, target_utilization=0.5)
    decision = desired_nodes(nodes(0.1, 0.1, 0.1, 0.1), policy)
    assert (decision.desired, decision.reason) == (2, Reason.AT_MIN)
    decision = desired_nodes(nodes(1.0, 1.0, 1.0, 1.0), policy)
    assert (decision.desired, decision.reason) == (5, Reason.AT_MAX)
    decision = desired_nodes(nodes(0.5), policy)  # on target but under the minimum
    assert (decision.desired, decision.reason) == (2, Reason.AT_MIN)


def test_no_nodes_asks_for_the_minimum():
    decision = desired_nodes([], ScalingPolicy(min_nodes=3))
    assert (decision.desired, decision.current, decision.reason) == (3, 0, Reason.NO_NODES)


def test_nodes_of_a_down_zone_are_not_counted():
    statuses = nodes(0.5, 0.5, zone="a") + nodes(0.0, 0.0, 0.0, zone="b")
    decision = desired_nodes(statuses, POLICY, down_zones=["b"])
    assert (decision.current, decision.desired) == (2, 2)
    everything = desired_nodes(statuses, POLICY)  # zone b's idle nodes would drag the mean
    assert everything.current == 5 and everything.desired < 5
    assert desired_nodes(statuses, POLICY, down_zones=["a", "b"]).reason == Reason.NO_NODES


def test_remember_keeps_the_window_and_adds_the_new_one():
    history = remember(((1.0, 3), (50.0, 4)), now=100.0, recommendation=2, window_s=60.0)
    assert history == ((50.0, 4), (100.0, 2))


def test_the_decision_signals_are_json_ready():
    decision = desired_nodes(nodes(0.75, 0.75, kv=(40, 100)), POLICY)
    signals = decision.signals_json()
    assert signals["load"] == {"observed": 0.75, "target": 0.5, "ratio": 1.5}
    assert signals["kv_occupancy"]["ratio"] == pytest.approx(0.5)


def test_parse_status_reads_a_membership_status_and_ignores_unknown_keys():
    status = parse_status(
        {
            "id": "n1",
            "peer": "127.0.0.1:7001",
            "zone": "z1",
            "load": 0.25,
            "run_queue": 3,
            "queue_time_s": 0.125,
            "kv_blocks_used": 10,
            "kv_blocks_total": 64,
            "something_new": [1, 2],
            "version": 1,
        }
    )
    assert status == NodeStatus("n1", "z1", 0.25, 0.125, 10, 64)
    assert parse_status({"id": "n2"}) == NodeStatus("n2")


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ([], "JSON object"),
        ("n1", "JSON object"),
        ({}, "id"),
        ({"id": ""}, "id"),
        ({"id": 7}, "id"),
        ({"id": "n", "zone": 3}, "zone"),
        ({"id": "n", "load": "high"}, "load"),
        ({"id": "n", "load": True}, "load"),
        ({"id": "n", "load": 1.5}, "load"),
        ({"id": "n", "load": -0.1}, "load"),
        ({"id": "n", "load": math.nan}, "load"),
        ({"id": "n", "queue_time_s": math.inf}, "queue_time_s"),
        ({"id": "n", "kv_blocks_total": -1}, "kv_blocks_total"),
        ({"id": "n", "kv_blocks_used": None}, "kv_blocks_used"),
    ],
)
def test_parse_status_refuses_malformed_fields_naming_them(data, field):
    with pytest.raises(ValueError, match=field):
        parse_status(data)


def test_used_blocks_beyond_the_total_are_capped():
    assert (
        parse_status({"id": "n", "kv_blocks_used": 90, "kv_blocks_total": 64}).kv_blocks_used == 64
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_nodes": 0}, "min_nodes"),
        ({"min_nodes": 5, "max_nodes": 4}, "max_nodes"),
        ({"target_utilization": 0}, "target_utilization"),
        ({"queue_time_target_s": -1}, "queue_time_target_s"),
        ({"kv_occupancy_target": 0}, "kv_occupancy_target"),
        ({"tolerance": 1.0}, "tolerance"),
        ({"scale_down_stabilization_s": -1}, "scale_down_stabilization_s"),
        ({"max_scale_up_factor": 1.0}, "max_scale_up_factor"),
    ],
)
def test_a_bad_policy_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ScalingPolicy(**kwargs)


def test_settings_give_the_policy_and_refuse_bad_bounds():
    from agentd.cluster.coordinator import policy_from_settings
    from agentd.errors import ConfigError
    from agentd.settings import load_settings

    policy = policy_from_settings(load_settings(min_nodes=2, max_nodes=4, scale_tolerance=0.2))
    assert (policy.min_nodes, policy.max_nodes, policy.tolerance) == (2, 4, 0.2)
    assert policy_from_settings(load_settings()) == ScalingPolicy(target_utilization=0.7)
    with pytest.raises(ConfigError, match=r"min_nodes \(5\) is larger than max_nodes \(4\)"):
        load_settings(min_nodes=5, max_nodes=4)
    with pytest.raises(ConfigError, match="max_scale_up_factor"):
        load_settings(max_scale_up_factor=1.0)
    with pytest.raises(ConfigError, match="target_utilization"):
        load_settings(target_utilization=1.5)
