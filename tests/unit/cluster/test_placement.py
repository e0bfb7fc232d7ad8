"""Placement: the partition of an address is the same in every process, partitions spread
evenly over addresses and over nodes, bad counts and owners are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from agentd.agents.address import Address, parse_address
from agentd.cluster import DEFAULT_PARTITIONS, Placement, partition_of
from agentd.errors import InvalidArgument

ADDRESSES = [f"decider/{i}" for i in range(0, 100_000, 997)] + [
    "echo/default",
    "chat/user@example.com:1",
]


def test_an_address_and_its_text_share_a_partition():
    for text in ADDRESSES:
        assert partition_of(parse_address(text)) == partition_of(text)
        assert 0 <= partition_of(text) < DEFAULT_PARTITIONS


def test_partitions_are_the_same_in_another_interpreter():
    # Python's str hash changes per process (PYTHONHASHSEED); placement must not.
    code = (
        "import json, sys; from agentd.cluster import partition_of; "
        "print(json.dumps([partition_of(a) for a in json.load(sys.stdin)]))"
    )
    here = [partition_of(a) for a in ADDRESSES]
    for seed in ("1", "2"):
        done = subprocess.run(
            [sys.executable, "-c", code],
            input=json.dumps(ADDRESSES),
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
            timeout=60,
            check=True,
        )
        assert json.loads(done.stdout) == here


def test_addresses_spread_evenly_over_partitions():
    counts = Counter(partition_of(Address("decider", str(i)), 64) for i in range(64_000))
    assert len(counts) == 64
    # 1,000 expected per partition; a binomial's spread is about ±32 (3 sigma ~ ±95).
    assert max(counts.values()) < 1_150 and min(counts.values()) > 850


@pytest.mark.parametrize(("nodes", "partitions"), [(1, 1024), (2, 1024), (3, 1024), (7, 10)])
def test_spread_deals_contiguous_near_equal_ranges(nodes, partitions):
    ids = [f"n{i}" for i in range(nodes)]
    placement = Placement.spread(ids, partitions, revision=5)
    assert placement.partitions == partitions and placement.revision == 5
    sizes = [len(placement.owned_by(node)) for node in ids]
    assert sum(sizes) == partitions and max(sizes) - min(sizes) <= 1
    for node in ids:
        owned = placement.owned_by(node)
        assert owned == list(range(owned[0], owned[-1] + 1))
    assert placement.nodes() == ids


def test_owner_follows_the_partition():
    placement = Placement.spread(["a", "b"], 8)
    for text in ADDRESSES:
        assert placement.owner(text) == placement.owners[partition_of(text, 8)]
    assert {placement.owner(a) for a in ADDRESSES} == {"a", "b"}


def test_a_newer_revision_wins():
    old = Placement.spread(["a"], 4, revision=3)
    new = Placement(["a", "a", "b", "b"], revision=4)
    assert new.newer_than(old) and not old.newer_than(new)
    assert new != old and Placement(["a", "a", "b", "b"], 4) == new


@pytest.mark.parametrize("partitions", [0, -1, 65_537, 2.5, True, "8"])
def test_bad_partition_counts_are_refused(partitions):
    with pytest.raises(InvalidArgument, match="partition count"):
        Placement.spread(["a"], partitions)


@pytest.mark.parametrize(("nodes", "match"), [([], "at least one node"), (["a", "a"], "distinct")])
def test_bad_node_lists_are_refused(nodes, match):
    with pytest.raises(InvalidArgument, match=match):
        Placement.spread(nodes, 8)


def test_every_partition_needs_an_owner():
    with pytest.raises(InvalidArgument, match="owner"):
        Placement(["a", ""])
