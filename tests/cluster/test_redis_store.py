"""The Redis state store on a real redis-server: versioned writes and fencing between two
"nodes" (store objects), group commit in few round trips, states found by another store
object or process with their versions, an actor host serving over it, bad URLs."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aredis
from prometheus_client import CollectorRegistry

from agentd import Agent
from agentd.agents import AgentRegistry
from agentd.cluster.backing import free_port
from agentd.errors import ConfigError, Unavailable
from agentd.observability.cluster_metrics import ClusterMetrics
from agentd.runtime import ActorHost, Runtime, WorkerPool
from agentd.runtime.state.redis import RedisStateStore
from tests.cluster.servers import Server


class Counter(Agent):
    name = "counter"

    async def handle(self, ctx, message):
        seen = ctx.state.get("seen", 0) + 1
        await asyncio.sleep(0)  # turns of one agent must not interleave all the same
        ctx.state["seen"] = seen
        return seen


@pytest.fixture
async def raw(redis: Server) -> AsyncIterator[aredis.Redis]:
    """A plain client on the test's Redis, to look at what the store wrote."""
    client = aredis.Redis(host=redis.host, port=redis.port)
    yield client
    await client.aclose()


async def opened(url: str, **kwargs) -> RedisStateStore:
    store = RedisStateStore(url, **kwargs)
    await store.open()
    return store


async def evalsha_calls(raw: aredis.Redis) -> int:
    stats = await raw.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_two_owners_of_one_agent_exactly_one_commits(redis: Server, raw) -> None:
    registry = CollectorRegistry()
    metrics = ClusterMetrics(registry)
    nodes = [await opened(redis.url, observer=metrics) for _ in range(2)]
    refused: list[tuple[set[str], BaseException]] = []
    for node in nodes:
        node.on_commit_failed = lambda keys, error: refused.append((set(keys), error))
    # Both believe they own c/1 (a hand-over in progress): both read it, both write it.
    assert [await node.load("c/1") for node in nodes] == [None, None]
    saves = [node.save("c/1", b'{"by":%d}' % i) for i, node in enumerate(nodes)]
    others = [node.save(f"c/other{i}", b"{}") for i, node in enumerate(nodes)]
    results = await asyncio.gather(*saves, return_exceptions=True)

    winners = [i for i, r in enumerate(results) if r is None]
    assert len(winners) == 1, results
    loser = 1 - winners[0]
    error = results[loser]
    assert isinstance(error, Unavailable)
    assert error.message == "agent c/1's state was written by another node; retry"
    assert [keys for keys, _ in refused] == [{"c/1"}]
    # The stored value is the winner's, at version 1.
    assert await raw.hgetall("agentd:state:c/1") == {b"v": b"1", b"s": b'{"by":%d}' % winners[0]}
    # The loser's other write in the same batch committed.
    await asyncio.gather(*others)
    assert await raw.hget(f"agentd:state:c/other{loser}", "s") == b"{}"
    assert nodes[loser].fenced == 1 and nodes[winners[0]].fenced == 0
    assert nodes[loser].errors == 0 and nodes[loser].failing() is None  # not a store fault
    assert registry.get_sample_value("agentd_cluster_fenced_writes_total") == 1

    # The loser reads again (as the host does after dropping the state) and may write.
    assert await nodes[loser].load("c/1") == b'{"by":%d}' % winners[0]
    await nodes[loser].save("c/1", b'{"by":"again"}')
    # Now the former winner is the stale one.
    with pytest.raises(Unavailable, match="written by another node"):
        await nodes[winners[0]].save("c/1", b'{"by":"stale"}')
    assert await raw.hgetall("agentd:state:c/1") == {b"v": b"2", b"s": b'{"by":"again"}'}
    for node in nodes:
        await node.aclose()


async def test_eight_racing_owners_one_commit_per_version(redis: Server, raw) -> None:
    nodes = [await opened(redis.url) for _ in range(8)]
    for round_ in range(5):
        for node in nodes:
            await node.load("race/1")
        results = await asyncio.gather(
            *(node.save("race/1", b"%d-%d" % (round_, i)) for i, node in enumerate(nodes)),
            return_exceptions=True,
        )
        winners = [i for i, r in enumerate(results) if r is None]
        assert len(winners) == 1, results
        assert all(isinstance(r, Unavailable) for r in results if r is not None)
        stored = await raw.hgetall("agentd:state:race/1")
        assert stored == {b"v": b"%d" % (round_ + 1), b"s": b"%d-%d" % (round_, winners[0])}
    assert sum(node.fenced for node in nodes) == 5 * 7
    for node in nodes:
        await node.aclose()


async def test_a_state_is_found_by_another_store_and_process_with_its_version(
    redis: Server,
) -> None:
    first = await opened(redis.url)
    for n in range(1, 4):
        await first.save("w/1", b'{"n":%d}' % n)
    assert first.version("w/1") == 3
    await first.aclose()

    # Another process (a node after a change of cluster size) reads it back.
    code = (
        "import asyncio\n"
        "from agentd.runtime.state.redis import RedisStateStore\n"
        "async def main():\n"
        f"    s = RedisStateStore({redis.url!r})\n"
        "    await s.open()\n"
        "    print(s.empty_at_open, (await s.load('w/1')).decode(), s.version('w/1'))\n"
        "    await s.save('w/1', b'{\"n\":4}')\n"
        "    await s.aclose()\n"
        "asyncio.run(main())\n"
    )
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE
    )
    stdout, _ = await asyncio.wait_for(child.communicate(), 60)
    assert child.returncode == 0
    assert stdout.decode().split() == ["False", '{"n":3}', "3"]

    again = await opened(redis.url)
    assert not again.empty_at_open
    assert await again.load("w/1") == b'{"n":4}'
    assert again.version("w/1") == 4
    assert await again.load("w/none") is None and again.version("w/none") == 0
    await again.aclose()


async def test_five_thousand_saves_commit_in_one_round_trip(redis: Server, raw) -> None:
    store = await opened(redis.url)
    await raw.config_resetstat()
    saves = [store.save(f"bulk/{i}", b'{"i":%d}' % i) for i in range(5000)]
    await asyncio.gather(*saves)
    # One pipeline of ceil(5000 / 2048) = 3 scripts: not a round trip per turn.
    assert store.round_trips == 1 and store.scripts == 3
    assert await evalsha_calls(raw) == 3
    assert store.writes == 5000 and store.commits == 1

    loads = await asyncio.gather(*(store.load(f"bulk/{i}") for i in range(5000)))
    assert loads == [b'{"i":%d}' % i for i in range(5000)]
    assert await evalsha_calls(raw) == 6  # the loads: one pipeline of 3 scripts as well
    assert {store.version(f"bulk/{i}") for i in range(5000)} == {1}
    await store.aclose()


async def test_saves_arriving_during_a_commit_go_in_the_next_batch(redis: Server) -> None:
    store = await opened(redis.url)
    first = store.save("g/1", b"1")
    await asyncio.sleep(0)  # the first batch is on its way
    later = [store.save(f"g/{i}", b"2") for i in range(2, 50)]
    later.append(store.save("g/1", b"3"))  # the same agent again: the last write wins
    await asyncio.gather(first, *later)
    assert store.commits == 2 and store.round_trips == 2
    assert await store.load("g/1") == b"3" and store.version("g/1") == 2
    await store.aclose()


async def test_a_load_waits_for_the_agents_own_queued_write(redis: Server) -> None:
    # Passivated right after a told turn, activated again: the load must see that turn.
    store = await opened(redis.url)
    for n in range(20):
        store.save_nowait("p/1", b'{"n":%d}' % n)
        assert await store.load("p/1") == b'{"n":%d}' % n
    await store.aclose()


async def test_an_actor_host_counts_200_asks_over_redis(redis: Server, raw) -> None:
    registry = AgentRegistry()
    registry.register(Counter)
    store = RedisStateStore(redis.url)
    runtime = Runtime(ActorHost(registry, store, pool=WorkerPool(8, 1000)))
    await runtime.start()
    replies = await asyncio.gather(
        *(runtime.host.ask("counter/c", None, timeout=30) for _ in range(200))
    )
    assert sorted(replies) == list(range(1, 201))
    await runtime.aclose()
    assert await raw.hget("agentd:state:counter/c", "s") == b'{"seen":200}'
    # Group commit: fewer versions than turns (many turns of the agent in one batch).
    assert 1 <= int(await raw.hget("agentd:state:counter/c", "v")) <= 200

    again = Runtime(ActorHost(registry, RedisStateStore(redis.url), pool=WorkerPool(2, 10)))
    await again.start()
    assert await again.host.ask("counter/c", None, timeout=30) == 201
    await again.aclose()


async def test_a_key_prefix_keeps_stores_apart(redis: Server, raw) -> None:
    one = await opened(redis.url, key_prefix="app1:")
    two = await opened(redis.url, key_prefix="app2:")
    await one.save("a/1", b"one")
    assert await two.load("a/1") is None
    assert await raw.hget("app1:a/1", "s") == b"one"
    three = await opened(redis.url, key_prefix="app1:")
    assert not three.empty_at_open
    for store in (one, two, three):
        await store.aclose()


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("", "must be a URL"),
        ("http://127.0.0.1:6379", "scheme must be"),
        ("127.0.0.1:6379", "scheme must be"),
        ("redis://", "no host"),
        ("redis://127.0.0.1:99999/0", "port is not a number"),
        ("redis://127.0.0.1:port/0", "port is not a number"),
        ("redis://127.0.0.1:6379/zero", "database must be a number"),
        ("unix://", "no socket path"),
    ],
)
def test_a_bad_url_is_a_config_error(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        RedisStateStore(url)


async def test_opening_without_redis_is_unavailable_and_quick(tmp_path) -> None:
    port = free_port()  # nothing listens there
    store = RedisStateStore(f"redis://127.0.0.1:{port}/0", socket_timeout_s=2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(Unavailable, match=f"Redis at 127.0.0.1:{port} is not reachable"):
        await store.open()
    assert loop.time() - started < 10


async def test_a_write_sent_again_after_its_reply_was_lost_is_not_fenced(redis: Server) -> None:
    # The client retries once on a new connection; if the first try had run, Redis holds
    # this very snapshot at the next version: that is this write, committed.
    store = await opened(redis.url)
    await store.save("once/1", b"same")
    store._versions["once/1"] = 0  # as before the first try
    await store.save("once/1", b"same")
    assert store.fenced == 0 and store.version("once/1") == 1
    store._versions["once/1"] = 0
    with pytest.raises(Unavailable, match="written by another node"):
        await store.save("once/1", b"different")  # not ours: a stale owner's
    await store.aclose()


async def test_passivated_agents_versions_are_forgotten_and_read_again(redis: Server) -> None:
    # A version per agent ever seen would grow without end on a long-running node.
    registry = AgentRegistry()
    registry.register(Counter)
    store = RedisStateStore(redis.url)
    host = ActorHost(registry, store, pool=WorkerPool(8, 1000))
    await host.start()
    try:
        for i in range(50):
            assert await host.ask(f"counter/f{i}", None, timeout=30) == 1
        assert all(store.version(f"counter/f{i}") >= 1 for i in range(50))
        await store.flush()
        assert host.passivate_idle(0) == 50
        assert [store.version(f"counter/f{i}") for i in range(50)] == [0] * 50
        # The next activation reads state and version back, and its write is not fenced.
        assert await host.ask("counter/f7", None, timeout=30) == 2
        assert store.version("counter/f7") == 2
    finally:
        await host.aclose()
