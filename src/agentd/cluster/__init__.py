"""Clustering: where an agent lives when a node is one of several (processes or machines)."""

from agentd.cluster.placement import DEFAULT_PARTITIONS, Placement, partition_of

__all__ = ["DEFAULT_PARTITIONS", "Placement", "partition_of"]
