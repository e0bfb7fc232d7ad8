"""etcd membership with real etcd and real nodes (open_node) in this process: statuses
under leases, partitions owned by exactly one node and covering all, every view current,
zone failover, a restart with the same id gets the same partitions back."""

from __future__ import annotations

import asyncio
import contextlib
import json

from agentd.cluster.etcd import EtcdClient
from agentd.cluster.placement import partition_of
from agentd.generate.types import SamplingParams
from agentd.node import NodeOptions
from tests.cluster.etcd_nodes import (
    PARTITIONS,
    addresses,
    converged,
    etcd_node,
    membership,
)


async def test_three_nodes_own_disjoint_partitions_covering_all(tmp_path, etcd):
    async with contextlib.AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(etcd_node(tmp_path, etcd.url, n, zone=f"z{i}"))
            for i, n in enumerate("abc")
        ]
        owners = await converged(nodes)
        counts = {n: owners.count(n) for n in "abc"}
        assert sum(counts.values()) == PARTITIONS
        assert max(counts.values()) - min(counts.values()) <= 1
        async with EtcdClient(etcd.url) as client:
            keys, _ = await client.get_prefix("/agentd/test/partitions/")
            assert {int(kv.key.rsplit("/", 1)[1]): kv.value.decode() for kv in keys} == dict(
                enumerate(owners)
            )
            # statuses under the nodes' leases, with what the coordinator reads
            items, _ = await client.get_prefix("/agentd/test/nodes/")
            statuses = {kv.key.rsplit("/", 1)[1]: (json.loads(kv.value), kv.lease) for kv in items}
        assert set(statuses) == {"a", "b", "c"}
        for i, node in enumerate(nodes):
            status, lease = statuses["abc"[i]]
            assert lease == status["lease"] == membership(node).lease.id
            assert status["peer"] == node.cluster.server.endpoint
            assert status["zone"] == f"z{i}" and status["version"] == 1
            for field in ("load", "run_queue", "active_agents", "tokens_per_s", "queue_time_s"):
                assert isinstance(status[field], int | float)
            assert status["kv_blocks_used"] == 0 and status["kv_blocks_total"] == 0
        # Every agent is reached from any node, and runs on its partition's owner.
        targets = addresses(30)
        for address in targets:
            assert await nodes[0].runtime.host.ask(address, 0) == 1
            assert await nodes[2].runtime.host.ask(address, 0) == 2
        for address in targets:
            owner = owners[partition_of(address, PARTITIONS)]
            node = nodes["abc".index(owner)]
            assert address in node.runtime.host._activations


async def test_a_zone_marked_down_hands_its_partitions_away_and_back(tmp_path, etcd):
    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(etcd_node(tmp_path, etcd.url, "a", zone="z1"))
        b = await stack.enter_async_context(etcd_node(tmp_path, etcd.url, "b", zone="z2"))
        await converged([a, b])
        async with EtcdClient(etcd.url) as client:
            await client.put("/agentd/test/scale/zone/failover", b'{"down": ["z2"]}')
            async with asyncio.timeout(20):
                while (
                    membership(a).owners != ["a"] * PARTITIONS
                    or membership(b).owners != ["a"] * PARTITIONS
                ):
                    await asyncio.sleep(0.05)
            # b still answers, forwarding everything to a
            for address in addresses(5):
                assert await b.runtime.host.ask(address, 0) >= 1
            await client.delete("/agentd/test/scale/zone/failover")
        await converged([a, b])


async def test_a_restart_with_the_same_id_gets_the_same_partitions(tmp_path, etcd):
    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(etcd_node(tmp_path, etcd.url, "a"))
        b = await stack.enter_async_context(etcd_node(tmp_path, etcd.url, "b"))
        async with etcd_node(tmp_path, etcd.url, "c") as c:
            before = await converged([a, b, c])
        # c left (its lease revoked): a and b own everything at once
        async with asyncio.timeout(10):
            while "c" in membership(a).owners or "" in membership(a).owners:
                await asyncio.sleep(0.05)
        async with etcd_node(tmp_path, etcd.url, "c") as c:
            assert await converged([a, b, c]) == before


async def _status(node_id: str, etcd_url: str) -> dict:
    async with EtcdClient(etcd_url) as client:
        found = await client.get(f"/agentd/test/nodes/{node_id}")
    assert found is not None
    return json.loads(found[0])


async def test_the_status_reports_the_run_queues_wait_and_tokens_per_second(tmp_path, etcd):
    options = NodeOptions(tools=False)  # with the language models
    async with etcd_node(tmp_path, etcd.url, "a", options=options, workers=1) as a:
        await converged([a])
        status = await _status("a", etcd.url)
        assert status["queue_time_s"] < 0.1 and status["tokens_per_s"] == 0.0
        # One worker, turns of 0.3 s queued behind each other: a job now waits.
        for address in addresses(8):
            await a.runtime.host.tell(address, "0.3")
        async with asyncio.timeout(10):
            while (await _status("a", etcd.url))["queue_time_s"] < 0.3:
                await asyncio.sleep(0.05)
        async with asyncio.timeout(20):  # drained: the average falls back
            while (await _status("a", etcd.url))["queue_time_s"] > 0.05:
                await asyncio.sleep(0.05)
        # Tokens generated while the status is refreshed.
        generation = a.generation
        assert generation is not None
        params = SamplingParams(max_tokens=64, temperature=0.0)
        rates = []
        async with asyncio.timeout(60):
            while not rates or max(rates) == 0.0:
                text = generation.complete(generation.default(), "count to ten", params)
                async for _ in text:
                    pass
                rates.append((await _status("a", etcd.url))["tokens_per_s"])
        assert max(rates) > 0.0
