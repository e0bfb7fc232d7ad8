"""Prometheus metrics of a cluster node: forwarding, partitions, fencing, leases and the
coordinator's decisions (docs/cluster.md).

The cluster's parts report through :class:`ClusterMetrics` (or :data:`NO_METRICS`, which
records nothing, where a node keeps no metrics registry).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["NO_METRICS", "ClusterMetrics", "ClusterObserver"]

_SECONDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5, 10.0)


class ClusterObserver:
    """What the cluster's parts report; this base records nothing."""

    def forwarded(self, kind: str, outcome: str, seconds: float) -> None:
        """One forwarded ask or stream (``kind``) ended with ``outcome`` (ok or the status
        name) after ``seconds`` on this node."""

    def forwarded_tells(self, count: int, batches: int = 1) -> None:
        """``count`` tells left for another node in ``batches`` frames."""

    def partitions_moved(self, direction: str, count: int) -> None:
        """``count`` partitions were taken (``direction`` "in") or handed away ("out")."""

    def partitions_owned(self, count: int) -> None: ...

    def fenced_write(self, count: int = 1) -> None:
        """The state store refused ``count`` writes of a stale owner."""

    def lease_renewal(self, outcome: str) -> None:
        """A lease keep-alive succeeded ("ok") or failed ("error")."""

    def scaling_decision(self, desired: int, reason: str) -> None:
        """The coordinator wrote a decision (``desired`` nodes)."""

    def desired_nodes(self, desired: int) -> None:
        """The last decision read from etcd (exported for an HPA or KEDA rule)."""

    def node(self, node_id: str) -> None:
        """This node's id: a scrape of a port that ``--processes N`` share names the
        process that answered."""


NO_METRICS = ClusterObserver()


class ClusterMetrics(ClusterObserver):
    def __init__(self, registry: CollectorRegistry) -> None:
        self._forwarded = Histogram(
            "agentd_cluster_forwarded_seconds",
            "Forwarded asks and streams: time from sending to the owner's answer.",
            ["kind", "outcome"],
            buckets=_SECONDS,
            registry=registry,
        )
        self._tells = Counter(
            "agentd_cluster_forwarded_tells", "Tells sent to their owner node.", registry=registry
        )
        self._tell_batches = Counter(
            "agentd_cluster_forwarded_tell_batches",
            "Frames carrying forwarded tells (many tells per frame).",
            registry=registry,
        )
        self._moves = Counter(
            "agentd_cluster_partition_moves",
            "Partitions taken by (in) or handed away from (out) this node.",
            ["direction"],
            registry=registry,
        )
        self._owned = Gauge(
            "agentd_cluster_partitions_owned", "Partitions this node owns.", registry=registry
        )
        self._fenced = Counter(
            "agentd_cluster_fenced_writes",
            "State writes refused because another owner wrote first (stale owner).",
            registry=registry,
        )
        self._renewals = Counter(
            "agentd_cluster_lease_renewals",
            "Lease keep-alives of this node, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self._decisions = Counter(
            "agentd_cluster_scaling_decisions",
            "Scaling decisions written by this node as coordinator.",
            ["reason"],
            registry=registry,
        )
        self._desired = Gauge(
            "agentd_cluster_desired_nodes",
            "Node count the coordinator's last decision asks for (-1 before any).",
            registry=registry,
        )
        self._desired.set(-1)
        self._node = Gauge(
            "agentd_cluster_node",
            "This node's id in its cluster (the sample is 1).",
            ["node"],
            registry=registry,
        )

    def forwarded(self, kind: str, outcome: str, seconds: float) -> None:
        self._forwarded.labels(kind, outcome).observe(seconds)

    def forwarded_tells(self, count: int, batches: int = 1) -> None:
        self._tells.inc(count)
        self._tell_batches.inc(batches)

    def partitions_moved(self, direction: str, count: int) -> None:
        self._moves.labels(direction).inc(count)

    def partitions_owned(self, count: int) -> None:
        self._owned.set(count)

    def fenced_write(self, count: int = 1) -> None:
        self._fenced.inc(count)

    def lease_renewal(self, outcome: str) -> None:
        self._renewals.labels(outcome).inc()

    def scaling_decision(self, desired: int, reason: str) -> None:
        self._decisions.labels(reason).inc()
        self._desired.set(desired)

    def desired_nodes(self, desired: int) -> None:
        self._desired.set(desired)

    def node(self, node_id: str) -> None:
        self._node.labels(node_id).set(1)
