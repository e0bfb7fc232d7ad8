"""Partition hand-over on join, with real etcd and nodes in this process sharing one SQLite
file: 64 callers keep calling stateful agents while a fourth node joins and takes its
share by draining; no call fails, and every acknowledged turn is in the agents' state."""

from __future__ import annotations

import asyncio
import contextlib

from tests.cluster.etcd_nodes import addresses, converged, etcd_node, membership

CALLERS = 64


async def test_a_joining_node_gets_its_share_with_no_failed_call(tmp_path, etcd):
    targets = addresses(128)
    acknowledged: dict[str, int] = {}
    failures: list[BaseException] = []
    async with contextlib.AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(etcd_node(tmp_path, etcd.url, n)) for n in "abc"]
        await converged(nodes)
        stop = asyncio.Event()

        async def caller(i: int) -> None:
            node = nodes[i % 3]
            k = i
            while not stop.is_set():
                address = targets[k % len(targets)]
                k += CALLERS
                try:
                    count = await node.runtime.host.ask(address, 0.002, timeout=15)
                except Exception as error:  # every failure is counted, none expected
                    failures.append(error)
                    continue
                key = str(address)
                acknowledged[key] = max(acknowledged.get(key, 0), count)

        tasks = [asyncio.create_task(caller(i)) for i in range(CALLERS)]
        await asyncio.sleep(0.5)
        d = await stack.enter_async_context(etcd_node(tmp_path, etcd.url, "d"))
        owners = await converged([*nodes, d], timeout=30)
        await asyncio.sleep(0.5)  # callers keep going after the move
        stop.set()
        await asyncio.gather(*tasks)
        assert failures == []
        assert owners.count("d") == 16
        assert membership(d).owners == owners
        # The count each agent answered last is what the next turn reads, wherever it runs.
        for address in targets:
            assert await nodes[0].runtime.host.ask(address, 0) == acknowledged[str(address)] + 1
        # d runs the agents of its partitions
        assert d.runtime.host.active_counts().get("counter", 0) > 0
