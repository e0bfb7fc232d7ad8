"""The real servers the cluster builds on, driven by the clients agentd uses (aetcd,
redis-py's asyncio client): what the cluster issue relies on works here (a lease that
expires takes its keys with it, compare-and-swap, prefix watch; an atomic Lua script)."""

from __future__ import annotations

import asyncio

import aetcd
import redis.asyncio as aredis


async def test_etcd_lease_expiry_takes_its_keys(etcd):
    async with aetcd.Client(host=etcd.host, port=etcd.port) as client:
        lease = await client.lease(1)
        await client.put(b"/agentd/test/nodes/a", b'{"zone": "z1"}', lease=lease)
        got = await client.get(b"/agentd/test/nodes/a")
        assert got is not None and got.value == b'{"zone": "z1"}'
        for _ in range(60):  # the TTL is 1 s; etcd revokes within about a second more
            if await client.get(b"/agentd/test/nodes/a") is None:
                break
            await asyncio.sleep(0.1)
        assert await client.get(b"/agentd/test/nodes/a") is None


async def test_etcd_compare_and_swap_lets_one_writer_win(etcd):
    async with aetcd.Client(host=etcd.host, port=etcd.port) as client:
        key = b"/agentd/test/partitions/7"

        async def take(node: bytes) -> bool:
            succeeded, _ = await client.transaction(
                compare=[client.transactions.version(key) == 0],
                success=[client.transactions.put(key, node)],
                failure=[],
            )
            return bool(succeeded)

        results = await asyncio.gather(*(take(f"n{i}".encode()) for i in range(8)))
        assert sum(results) == 1
        winner = (await client.get(key)).value
        assert winner == f"n{results.index(True)}".encode()


async def test_etcd_prefix_watch_sees_a_put(etcd):
    async with aetcd.Client(host=etcd.host, port=etcd.port) as client:
        watch = await client.watch_prefix(b"/agentd/test/nodes/")
        await client.put(b"/agentd/test/nodes/b", b"{}")
        async with asyncio.timeout(10):
            async for event in watch:
                assert event.kv.key == b"/agentd/test/nodes/b"
                break
        await watch.cancel()


async def test_redis_script_writes_atomically_when_the_version_matches(redis):
    client = aredis.Redis(host=redis.host, port=redis.port)
    try:
        # Versioned write: set only if the stored version is the one the writer read.
        script = client.register_script(
            "local v = tonumber(redis.call('HGET', KEYS[1], 'v') or '0') "
            "if v ~= tonumber(ARGV[1]) then return -1 end "
            "redis.call('HSET', KEYS[1], 'v', v + 1, 'state', ARGV[2]) return v + 1"
        )
        assert await script(keys=["agent:echo/a"], args=[0, b"{}"]) == 1
        assert await script(keys=["agent:echo/a"], args=[0, b'{"x": 1}']) == -1  # stale
        assert await script(keys=["agent:echo/a"], args=[1, b'{"x": 1}']) == 2
        assert await client.hget("agent:echo/a", "state") == b'{"x": 1}'
    finally:
        await client.aclose()
