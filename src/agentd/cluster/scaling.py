"""The scaling rule: how many nodes a cluster wants, from its nodes' statuses.

Pure (no I/O, no clock of its own): the coordinator (:mod:`agentd.cluster.coordinator`)
reads the statuses from etcd, calls :func:`desired_nodes` and writes the decision back.

The rule is Kubernetes' Horizontal Pod Autoscaler's, with LLM-aware signals beside load:

* per signal, ``ratio = observed / target``: mean load (0..1, the CPU-ish utilisation),
  mean queue time of a turn, and KV-cache occupancy (blocks used / blocks total, over the
  nodes that have a KV cache);
* a signal within ``tolerance`` of its target (``|ratio - 1| <= tolerance``) proposes no
  change, any other proposes ``ceil(current * ratio)``; the largest proposal wins (one
  saturated signal is enough to scale up, every signal must agree to scale down);
* scale-down stabilisation: the recommendation is the highest one of the last
  ``scale_down_stabilization_s`` (a dip in load does not remove a node at once);
* scale-up is limited per decision (at most ``max_scale_up_factor`` times the current
  count, at least one more node);
* the result is clamped to ``[min_nodes, max_nodes]``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = [
    "Decision",
    "NodeStatus",
    "Reason",
    "Recommendation",
    "ScalingPolicy",
    "Signal",
    "desired_nodes",
    "parse_status",
    "remember",
]


class Reason(StrEnum):
    """Why a decision is what it is (a metric label and the decision's ``reason``)."""

    SCALE_UP = "scale_up"
    SCALE_DOWN = "scale_down"
    WITHIN_TOLERANCE = "within_tolerance"  # every signal close enough to its target
    STABILIZING = "stabilizing"  # a scale-down held back by the window's higher recommendation
    RATE_LIMITED = "rate_limited"  # a scale-up cut to the most one step may add
    AT_MIN = "min_nodes"  # clamped up to min_nodes
    AT_MAX = "max_nodes"  # clamped down to max_nodes
    NO_NODES = "no_nodes"  # no live node outside a down zone: ask for the minimum


@dataclass(frozen=True, slots=True)
class ScalingPolicy:
    """The rule's knobs (settings: min_nodes, max_nodes, target_utilization, ...)."""

    min_nodes: int = 1
    max_nodes: int = 10
    target_utilization: float = 0.7
    queue_time_target_s: float = 0.5
    kv_occupancy_target: float = 0.8
    tolerance: float = 0.1
    scale_down_stabilization_s: float = 300.0
    max_scale_up_factor: float = 2.0

    def __post_init__(self) -> None:
        if self.min_nodes < 1:
            raise ValueError(f"min_nodes must be at least 1, not {self.min_nodes}")
        if self.max_nodes < self.min_nodes:
            raise ValueError(
                f"max_nodes ({self.max_nodes}) is smaller than min_nodes ({self.min_nodes})"
            )
        for name in ("target_utilization", "queue_time_target_s", "kv_occupancy_target"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")
        if not 0 <= self.tolerance < 1:
            raise ValueError(f"tolerance must be in [0, 1), not {self.tolerance}")
        if self.scale_down_stabilization_s < 0:
            raise ValueError("scale_down_stabilization_s must not be negative")
        if not self.max_scale_up_factor > 1:
            raise ValueError(f"max_scale_up_factor must be above 1, not {self.max_scale_up_factor}")


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """The part of a node's status (``/agentd/<cluster>/nodes/<id>``) the rule reads."""

    id: str
    zone: str = "default"
    load: float = 0.0
    queue_time_s: float = 0.0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0


def _number(data: Mapping[str, Any], key: str, low: float, high: float) -> float:
    value = data.get(key, 0)
    # bool is an int in Python; a status saying "load": true is malformed, not 1.0.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, not {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{key} must be in [{low:g}, {high:g}], not {value!r}")
    return float(value)


def parse_status(data: object) -> NodeStatus:
    """A node status from its decoded JSON; ValueError naming the field if malformed.

    Unknown keys are ignored (a newer node may report more)."""
    if not isinstance(data, Mapping):
        raise ValueError(f"a node status must be a JSON object, not {type(data).__name__}")
    node_id, zone = data.get("id"), data.get("zone", "default")
    if not isinstance(node_id, str) or not node_id:
        raise ValueError(f"id must be a non-empty string, not {node_id!r}")
    if not isinstance(zone, str) or not zone:
        raise ValueError(f"zone must be a non-empty string, not {zone!r}")
    used = _number(data, "kv_blocks_used", 0, 2**53)
    total = _number(data, "kv_blocks_total", 0, 2**53)
    return NodeStatus(
        id=node_id,
        zone=zone,
        load=_number(data, "load", 0.0, 1.0),
        queue_time_s=_number(data, "queue_time_s", 0.0, 1e9),
        kv_blocks_used=int(min(used, total)),
        kv_blocks_total=int(total),
    )


@dataclass(frozen=True, slots=True)
class Signal:
    """One input of the rule: what was observed, its target and their ratio."""

    observed: float
    target: float

    @property
    def ratio(self) -> float:
        return self.observed / self.target

    def as_json(self) -> dict[str, float]:
        return {
            "observed": round(self.observed, 6),
            "target": self.target,
            "ratio": round(self.ratio, 6),
        }


@dataclass(frozen=True, slots=True)
class Decision:
    """A desired node count and how it came about.

    ``recommendation`` is the rule's count before stabilisation, rate limit and clamping:
    the caller keeps it in its history (:func:`remember`) for the next decisions."""

    desired: int
    current: int
    reason: Reason
    recommendation: int
    signals: dict[str, Signal] = field(default_factory=dict)

    def signals_json(self) -> dict[str, dict[str, float]]:
        return {name: signal.as_json() for name, signal in self.signals.items()}


Recommendation = tuple[float, int]  # (when, recommended count) on the caller's clock


def _signals(nodes: Sequence[NodeStatus], policy: ScalingPolicy) -> dict[str, Signal]:
    count = len(nodes)
    signals = {
        "load": Signal(sum(n.load for n in nodes) / count, policy.target_utilization),
        "queue_time_s": Signal(
            sum(n.queue_time_s for n in nodes) / count, policy.queue_time_target_s
        ),
    }
    total = sum(n.kv_blocks_total for n in nodes)
    if total > 0:  # nodes without a KV cache (no language model) say nothing about it
        used = sum(n.kv_blocks_used for n in nodes)
        signals["kv_occupancy"] = Signal(used / total, policy.kv_occupancy_target)
    return signals


def desired_nodes(
    statuses: Iterable[NodeStatus],
    policy: ScalingPolicy,
    history: Sequence[Recommendation] = (),
    now: float = 0.0,
    down_zones: Iterable[str] = (),
) -> Decision:
    """The node count the cluster wants now.

    ``statuses``: one per live node (nodes of ``down_zones`` are not counted: their
    partitions are moving away). ``history``: earlier recommendations (see
    :func:`remember`), for the scale-down window ending at ``now``."""
    down = frozenset(down_zones)
    nodes = [status for status in statuses if status.zone not in down]
    current = len(nodes)
    if current == 0:
        return Decision(policy.min_nodes, 0, Reason.NO_NODES, policy.min_nodes)
    signals = _signals(nodes, policy)
    proposals = [
        current if abs(s.ratio - 1) <= policy.tolerance else math.ceil(current * s.ratio - 1e-9)
        for s in signals.values()
    ]
    recommendation = max(proposals)
    reason = (
        Reason.SCALE_UP
        if recommendation > current
        else Reason.SCALE_DOWN
        if recommendation < current
        else Reason.WITHIN_TOLERANCE
    )
    desired = recommendation
    if desired < current:
        # The highest recommendation of the window (this one included) wins, as in HPA.
        since = now - policy.scale_down_stabilization_s
        held = max((count for at, count in history if at >= since), default=desired)
        if held > desired:
            desired, reason = min(held, current), Reason.STABILIZING
    elif desired > current:
        most = max(math.ceil(current * policy.max_scale_up_factor), current + 1)
        if desired > most:
            desired, reason = most, Reason.RATE_LIMITED
    if desired < policy.min_nodes:
        desired, reason = policy.min_nodes, Reason.AT_MIN
    elif desired > policy.max_nodes:
        desired, reason = policy.max_nodes, Reason.AT_MAX
    return Decision(desired, current, reason, recommendation, signals)


def remember(
    history: Sequence[Recommendation], now: float, recommendation: int, window_s: float
) -> tuple[Recommendation, ...]:
    """``history`` with ``(now, recommendation)`` added and what fell out of the window
    dropped (the coordinator keeps this between decisions)."""
    since = now - window_s
    return (*(item for item in history if item[0] >= since), (now, recommendation))
