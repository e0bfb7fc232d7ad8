"""The coordinator inside real etcd-mode nodes (open_node): every node stands, one leads and
writes a decision, every node exports it on /metrics, and the lead moves when the leader's
node closes."""

from __future__ import annotations

import asyncio
import contextlib
import json

from agentd.cluster.etcd import EtcdClient
from tests.cluster.etcd_nodes import converged, etcd_node


def _desired(node) -> float:
    text = node.metrics.render()[0].decode()
    line = next(li for li in text.splitlines() if li.startswith("agentd_cluster_desired_nodes "))
    return float(line.split()[1])


async def _decision(client: EtcdClient) -> dict | None:
    found = await client.get("/agentd/test/scale/horizontal")
    return None if found is None else json.loads(found[0])


async def test_one_node_leads_writes_the_decision_and_every_node_exports_it(tmp_path, etcd):
    fast = {"scale_interval_s": 0.2, "min_nodes": 1, "max_nodes": 5}
    async with contextlib.AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(etcd_node(tmp_path, etcd.url, name, **fast))
            for name in ("a", "b")
        ]
        await converged(nodes)
        async with EtcdClient(etcd.url) as client:
            async with asyncio.timeout(20):  # the first may predate b's joining: wait for 2
                while (decision := await _decision(client)) is None or decision["current"] != 2:
                    await asyncio.sleep(0.1)
            leaders = [n for n in nodes if n.cluster.coordinator.is_leader]
            assert len(leaders) == 1
            assert decision["by"] == leaders[0].cluster.node_id
            assert 1 <= decision["desired"] <= 5
            async with asyncio.timeout(20):  # every node follows the decision
                while any(_desired(n) != decision["desired"] for n in nodes):
                    await asyncio.sleep(0.1)
            # The leader's node closes: the other one leads and decides from then on.
            leader = leaders[0]
            other = next(n for n in nodes if n is not leader)
            await leader.aclose()
            async with asyncio.timeout(20):
                while not other.cluster.coordinator.is_leader:
                    await asyncio.sleep(0.1)
                while (decision := await _decision(client))["by"] != other.cluster.node_id:
                    await asyncio.sleep(0.1)
            assert decision["current"] == 1
