"""Placement: an agent address maps to one of a fixed number of partitions, and each
partition to the one node that owns it.

The partition of an address depends only on the address and the partition count, never on
the process (Python's ``hash`` of a string changes with every interpreter; CRC-32 of the
address's UTF-8 bytes does not), so every node of a cluster, and a node after a restart,
computes the same partition. Ownership is a :class:`Placement`: one owner per partition,
with the revision it was read at (etcd's, in a multi-machine cluster), so that a newer
placement can replace an older one and never the other way round.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

from agentd.agents.address import Address
from agentd.errors import InvalidArgument

__all__ = ["DEFAULT_PARTITIONS", "Placement", "partition_of"]

DEFAULT_PARTITIONS = 1024
MAX_PARTITIONS = 65_536


def partition_of(address: Address | str, partitions: int = DEFAULT_PARTITIONS) -> int:
    """The partition (``0 <= p < partitions``) of ``address`` (an Address or its
    ``type/id`` text; a bare ``type`` is not normalised here, parse it first)."""
    text = address if isinstance(address, str) else address.type + "/" + address.id
    return zlib.crc32(text.encode()) % partitions


def check_partitions(partitions: int) -> int:
    """``partitions`` if it is a usable partition count, else InvalidArgument."""
    if isinstance(partitions, bool) or not isinstance(partitions, int):
        raise InvalidArgument(f"the partition count must be an integer, not {partitions!r}")
    if not 1 <= partitions <= MAX_PARTITIONS:
        raise InvalidArgument(
            f"the partition count must be between 1 and {MAX_PARTITIONS}, not {partitions}"
        )
    return partitions


class Placement:
    """Which node owns each partition, as of ``revision``."""

    __slots__ = ("owners", "revision")

    def __init__(self, owners: Sequence[str], revision: int = 0, *, unowned: bool = False) -> None:
        """``unowned``: a partition may have no owner yet (the empty string), as while an
        etcd cluster hands partitions over; calls to its agents fail with a retry hint."""
        check_partitions(len(owners))
        if any(not isinstance(owner, str) or not (owner or unowned) for owner in owners):
            raise InvalidArgument("every partition needs an owner (a non-empty node id)")
        self.owners: tuple[str, ...] = tuple(owners)
        self.revision = revision

    @classmethod
    def spread(
        cls, nodes: Sequence[str], partitions: int = DEFAULT_PARTITIONS, revision: int = 0
    ) -> Placement:
        """Partitions dealt to ``nodes`` in contiguous, near-equal ranges (the first
        ``partitions % len(nodes)`` nodes get one more): the static placement of
        ``--processes N`` and the starting point of a cluster."""
        check_partitions(partitions)
        if not nodes:
            raise InvalidArgument("a placement needs at least one node")
        if len(set(nodes)) != len(nodes):
            raise InvalidArgument(f"node ids must be distinct: {list(nodes)}")
        share, extra = divmod(partitions, len(nodes))
        owners: list[str] = []
        for index, node in enumerate(nodes):
            owners.extend([node] * (share + (index < extra)))
        return cls(owners, revision)

    @property
    def partitions(self) -> int:
        return len(self.owners)

    def owner(self, address: Address | str) -> str:
        """The node that owns ``address``'s agent."""
        return self.owners[partition_of(address, len(self.owners))]

    def owned_by(self, node: str) -> list[int]:
        """The partitions ``node`` owns, in order."""
        return [p for p, owner in enumerate(self.owners) if owner == node]

    def nodes(self) -> list[str]:
        """Every node that owns a partition, in the order of their first partition."""
        return list(dict.fromkeys(self.owners))

    def newer_than(self, other: Placement) -> bool:
        return self.revision > other.revision

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Placement)
            and self.owners == other.owners
            and self.revision == other.revision
        )

    def __hash__(self) -> int:
        return hash((self.owners, self.revision))

    def __repr__(self) -> str:
        counts = {node: len(self.owned_by(node)) for node in self.nodes()}
        return f"Placement(revision={self.revision}, partitions per node={counts})"
