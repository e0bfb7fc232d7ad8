"""Redis restarted (kill -9, then started again on the same port and data folder): the
state store fails fast while it is down (UNAVAILABLE, readiness says why), loses nothing it
acknowledged (the test Redis syncs its append-only file on every write), and serves again
by itself once Redis is back: no reopen, no node restart."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest
import redis as syncredis

from agentd.errors import Unavailable
from agentd.runtime.state.redis import RedisStateStore
from agentd.testing import start_server
from agentd.v1 import agent_pb2 as pb
from agentd.v1 import agent_pb2_grpc as pb_grpc
from tests.cluster.servers import Server, redis_server

PLUGINS = Path(__file__).parent.parent / "plugins"


def kill(server: Server) -> None:
    server.process.kill()  # SIGKILL: no shutdown, no final AOF rewrite
    server.process.wait()


async def test_the_store_fails_fast_while_redis_is_down_and_recovers_by_itself(
    tmp_path: Path,
) -> None:
    with redis_server(tmp_path) as server:
        port = server.port
        store = RedisStateStore(server.url, socket_timeout_s=2, failure_window_s=60)
        await store.open()
        await store.save("f/1", b'{"n":1}')
        kill(server)

        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(Unavailable, match=f"Redis at 127.0.0.1:{port}"):
            await asyncio.wait_for(store.save("f/1", b'{"n":2}'), 30)
        with pytest.raises(Unavailable, match="ConnectionError"):
            await asyncio.wait_for(store.load("f/2"), 30)
        assert loop.time() - started < 10  # refused connections: no waiting out a timeout
        reason = store.failing()
        assert reason is not None and "the last 2 operations failed" in reason, reason
        assert store.errors == 1

    with redis_server(tmp_path, port):  # same port, same data: the AOF is read back
        # The same store object: its pool reconnects, its scripts are loaded again.
        assert await store.load("f/1") == b'{"n":1}'  # the failed write did not land
        assert store.version("f/1") == 1
        await store.save("f/1", b'{"n":3}')
        assert store.failing() is None
        assert await store.load("f/1") == b'{"n":3}' and store.version("f/1") == 2
        await store.aclose()


def test_a_serving_node_loses_nothing_acknowledged_across_a_redis_restart(
    tmp_path: Path,
) -> None:
    agents = [f"counter/r{i}" for i in range(4)]
    with redis_server(tmp_path) as first:
        port, url = first.port, first.url
        node = start_server(
            ["--plugins", str(PLUGINS)],
            env={"AGENTD_STATE_STORE": "redis", "AGENTD_REDIS_URL": url},
        )
        acknowledged: dict[str, list[int]] = {a: [] for a in agents}
        refused: list[str] = []
        other: list[str] = []
        stop = threading.Event()

        def ask_forever() -> None:
            with grpc.insecure_channel(node.target) as channel:
                stub = pb_grpc.AgentServiceStub(channel)
                while not stop.is_set():
                    for agent in agents:
                        request = pb.InvokeRequest(agent=agent, message=pb.Message(text=""))
                        try:
                            reply = stub.Invoke(request, timeout=10)
                        except grpc.RpcError as exc:
                            if exc.code() is grpc.StatusCode.UNAVAILABLE:
                                refused.append(exc.details())
                            else:
                                other.append(f"{exc.code()}: {exc.details()}")
                            time.sleep(0.01)
                        else:
                            acknowledged[agent].append(int(reply.message.text))

        def acks() -> int:
            return sum(len(v) for v in acknowledged.values())

        def until(condition, what: str, timeout: float = 30.0) -> None:
            end = time.monotonic() + timeout
            while not condition():
                assert time.monotonic() < end, f"timed out waiting for {what}"
                time.sleep(0.02)

        client = threading.Thread(target=ask_forever, daemon=True)
        client.start()
        try:
            until(lambda: acks() >= 40, "asks before the restart")
            kill(first)
            down_at = len(refused)
            until(lambda: len(refused) >= down_at + 8, "UNAVAILABLE while Redis is down")
            ready = httpx.get(node.url + "/readyz", timeout=10)
            assert ready.status_code == 503 and "state store" in ready.text, ready.text
            acked_while_down = acks()

            with redis_server(tmp_path, port):
                until(lambda: acks() >= acked_while_down + 40, "asks after the restart")
                stop.set()
                client.join(30)
                until(
                    lambda: httpx.get(node.url + "/readyz", timeout=10).status_code == 200,
                    "readiness after the restart",
                )
                with syncredis.Redis(host="127.0.0.1", port=port) as raw:
                    persisted = {
                        a: int(raw.hget("agentd:state:" + a, "s").split(b":")[1].rstrip(b"}"))
                        for a in agents
                    }
        finally:
            stop.set()
            client.join(30)
            node.stop()

    assert other == [], other[:5]
    assert any("state" in r for r in refused), refused[:5]
    for agent in agents:
        replies = acknowledged[agent]
        # An acknowledged count lost in the restart would be counted again: the replies
        # would repeat a number. A turn that failed is not counted.
        assert replies == sorted(set(replies)), (agent, replies)
        # Each acknowledged ask is in the persisted count (a write whose reply was lost
        # in the kill may be there too, never fewer).
        assert persisted[agent] >= replies[-1] >= len(replies), (
            agent,
            persisted[agent],
            replies[-5:],
        )


async def test_the_first_write_after_an_unnoticed_restart_commits(tmp_path: Path) -> None:
    # Nothing used the pool while Redis was down: its connections are broken without the
    # store knowing. The first batch after the restart must not fail on one of them.
    with redis_server(tmp_path) as server:
        port = server.port
        store = RedisStateStore(server.url)
        await store.open()
        await asyncio.gather(store.save("u/1", b"1"), store.load("u/2"))
        kill(server)
    with redis_server(tmp_path, port):
        await store.save("u/1", b"2")
        assert await store.load("u/2") is None
        assert store.errors == 0 and store.failing() is None
        await store.aclose()
