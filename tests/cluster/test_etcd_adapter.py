"""agentd.cluster.etcd against a real etcd: reads with revisions, conditional writes,
leases, prefix watches, and the errors a caller gets (bad URL, etcd unreachable, a lost
lease, a compacted watch)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from agentd.cluster.etcd import (
    EtcdClient,
    EventKind,
    LeaseLost,
    WatchCompacted,
    WatchEvent,
    parse_etcd_url,
)
from agentd.errors import InvalidArgument, Unavailable


def test_urls_are_parsed_and_bad_ones_refused() -> None:
    assert parse_etcd_url("http://127.0.0.1:2379") == [("127.0.0.1", 2379)]
    assert parse_etcd_url("http://a:1, b:2") == [("a", 1), ("b", 2)]
    for bad in ("", "http://a", "https://a:1", "http://a:1/x", "http://a:99999", "a:1,,b:2"):
        with pytest.raises(InvalidArgument):
            parse_etcd_url(bad)


async def test_reads_and_conditional_writes(etcd) -> None:
    async with EtcdClient(etcd.url) as client:
        assert await client.get("/t/a") is None
        assert await client.create("/t/a", b"1")
        assert not await client.create("/t/a", b"2")
        value, rev = await client.get("/t/a")
        assert value == b"1"
        assert not await client.compare_and_swap("/t/a", b"3", rev - 1)
        assert await client.compare_and_swap("/t/a", b"3", rev)
        assert (await client.get("/t/a"))[0] == b"3"
        # mod_revision 0 means "absent": a CAS that creates
        assert not await client.compare_and_swap("/t/a", b"4", 0)
        assert await client.compare_and_swap("/t/b", b"b", 0)
        items, revision = await client.get_prefix("/t/")
        assert [(kv.key, kv.value) for kv in items] == [("/t/a", b"3"), ("/t/b", b"b")]
        assert revision == await client.revision() >= items[-1].mod_revision
        _, rev = await client.get("/t/b")
        assert not await client.delete_if("/t/b", rev + 100)
        assert await client.delete_if("/t/b", rev)
        assert await client.delete("/t/a")
        assert not await client.delete("/t/a")


async def test_a_lease_keeps_its_keys_until_revoked_or_expired(etcd) -> None:
    async with EtcdClient(etcd.url) as client:
        lease = await client.grant_lease(1.2)
        assert lease.ttl == 2
        await client.put("/t/leased", b"x", lease=lease)
        assert await client.refresh_lease(lease) > 0
        await client.revoke_lease(lease)
        assert await client.get("/t/leased") is None
        with pytest.raises(LeaseLost):
            await client.refresh_lease(lease)
        await client.revoke_lease(lease)  # already gone: no error
        with pytest.raises(LeaseLost):
            await client.put("/t/leased", b"x", lease=lease)
        with pytest.raises(InvalidArgument):
            await client.grant_lease(0)


async def test_a_prefix_watch_sees_puts_and_deletes_from_a_revision(etcd) -> None:
    async with EtcdClient(etcd.url) as client:
        await client.put("/w/before", b"0")
        start = await client.revision()
        await client.put("/w/a", b"1")
        await client.put("/other", b"-")
        await client.delete("/w/a")
        events: list[WatchEvent] = []
        async with asyncio.timeout(10):
            async for event in await client.watch_prefix("/w/", start + 1):
                events.append(event)
                if len(events) == 2:
                    break
        assert [(e.kind, e.key, e.value) for e in events] == [
            (EventKind.PUT, "/w/a", b"1"),
            (EventKind.DELETE, "/w/a", b""),
        ]
        assert events[0].mod_revision == start + 1 < events[1].mod_revision


async def test_a_watch_ends_when_the_client_closes(etcd) -> None:
    client = EtcdClient(etcd.url)
    await client.connect()
    watch = await client.watch_prefix("/w/")

    async def drain() -> list[WatchEvent]:
        return [event async for event in watch]

    task = asyncio.create_task(drain())
    await asyncio.sleep(0.1)
    await client.aclose()
    async with asyncio.timeout(5):
        assert await task == []


async def test_a_compacted_watch_is_reported(etcd) -> None:
    async with EtcdClient(etcd.url) as client:
        for i in range(3):
            await client.put("/c/k", str(i).encode())
        revision = await client.revision()
        await client.compact(revision)
        with pytest.raises(WatchCompacted):
            async with asyncio.timeout(10):
                async for _ in await client.watch_prefix("/c/", 1):
                    pass


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_unreachable_etcd_is_unavailable_within_the_timeout() -> None:
    client = EtcdClient(f"http://127.0.0.1:{_closed_port()}", timeout=1.0)
    started = time.monotonic()
    with pytest.raises(Unavailable, match="did not answer"):
        await client.connect()
    assert time.monotonic() - started < 5
    await client.aclose()


async def test_the_next_endpoint_is_tried(etcd) -> None:
    url = f"http://127.0.0.1:{_closed_port()},{etcd.url}"
    async with EtcdClient(url, timeout=1.0) as client:
        await client.put("/t/x", b"1")
        assert client.endpoint == etcd.url


async def test_a_watch_raises_unavailable_when_etcd_stops(etcd) -> None:
    async with EtcdClient(etcd.url, timeout=1.0) as client:
        watch = await client.watch_prefix("/w/")
        etcd.process.terminate()
        etcd.process.wait(timeout=10)
        with pytest.raises(Unavailable):
            async with asyncio.timeout(10):
                async for _ in watch:
                    pass
        with pytest.raises(Unavailable):
            await client.get("/w/x")
