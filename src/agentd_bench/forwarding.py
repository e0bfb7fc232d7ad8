"""Added latency of a forwarded call: an ask to an agent owned by another node, over a
unix socket and over TCP on loopback, against the same ask made on the owner itself.

Two nodes run in this process (one event loop: the figure is the forwarding work of both
sides plus the socket, without a second process's scheduling). ``measure_forwarding`` is
what ``agentd bench cluster`` calls; ``python -m agentd_bench.forwarding`` prints it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from agentd import Agent
from agentd.agents import AgentRegistry
from agentd.agents.address import Address
from agentd.agents.message import Message
from agentd.cluster.codec import decode_tells, encode_tells
from agentd.node import Node, NodeOptions, open_node
from agentd.settings import Settings
from agentd_bench.servers import free_port

__all__ = ["measure_codec", "measure_forwarding"]


class _Echo(Agent):
    name = "benchecho"

    async def handle(self, ctx: Any, message: Any) -> Any:
        return message


def _peers(scheme: str, folder: Path) -> list[str]:
    if scheme == "unix":
        return [f"{n}=unix:{folder}/{n}.sock" for n in "ab"]
    return [f"{n}=tcp:127.0.0.1:{free_port()}" for n in "ab"]


def _percentiles(samples: list[float]) -> dict[str, float]:
    samples = sorted(samples)
    return {
        "p50_ms": round(1000 * statistics.median(samples), 4),
        "p99_ms": round(1000 * samples[int(0.99 * (len(samples) - 1))], 4),
    }


async def _latencies(host: Any, address: Address, n: int) -> list[float]:
    message = Message(text="ping")
    for _ in range(min(200, n)):  # warm up: connection, activation, caches
        await host.ask(address, message)
    samples = []
    clock = time.perf_counter
    for _ in range(n):
        started = clock()
        await host.ask(address, message)
        samples.append(clock() - started)
    return samples


async def _measure(scheme: str, n: int) -> dict[str, Any]:
    registry = AgentRegistry()
    registry.register(_Echo)
    with tempfile.TemporaryDirectory(prefix="agentd-fwd-") as scratch:
        folder = Path(scratch)
        peers = _peers(scheme, folder)
        options = NodeOptions(metrics=False, generation=False, tools=False)
        async with contextlib.AsyncExitStack() as stack:
            nodes: list[Node] = []
            for node_id in "ab":
                settings = Settings(
                    plugins=folder / "plugins",
                    state_store="memory",
                    tools_cache_dir=folder / "tools",
                    node_id=node_id,
                    peers=peers,
                )
                nodes.append(
                    await stack.enter_async_context(
                        open_node(settings, registry=registry, options=options)
                    )
                )
            a, b = nodes
            assert a.cluster is not None
            forwarder = a.cluster.forwarder
            address = next(
                x
                for i in range(100_000)
                if forwarder.owner(x := Address("benchecho", f"x{i}")) == "b"
            )
            local = await _latencies(b.runtime.host, address, n)
            forwarded = await _latencies(a.runtime.host, address, n)
    local_p, forwarded_p = _percentiles(local), _percentiles(forwarded)
    added = round(forwarded_p["p50_ms"] - local_p["p50_ms"], 4)
    return {"local": local_p, "forwarded": forwarded_p, "added_p50_ms": added}


def measure_codec(batch: int = 4096, repeat: int = 20) -> dict[str, float]:
    """Encode + decode time of one batch of ``batch`` tells in the swarm's two forms."""
    import numpy as np

    addresses = [Address("decider", str(i)) for i in range(batch)]
    features = np.ones((batch, 1, 16), np.float32)
    forms: dict[str, list[Any]] = {
        "int_pairs": [(i, i % 7) for i in range(batch)],
        "int_and_array": list(zip(range(batch), features, strict=True)),
    }
    result = {}
    for name, messages in forms.items():
        best = float("inf")
        for _ in range(repeat):
            started = time.perf_counter()
            decode_tells(encode_tells(addresses, messages))
            best = min(best, time.perf_counter() - started)
        result[f"{name}_ms"] = round(1000 * best, 3)
    return result


def measure_forwarding(n: int = 2000) -> dict[str, Any]:
    """p50/p99 of ``n`` asks made on the owner and forwarded from another node, over a
    unix socket and TCP on loopback, and the added p50; plus the tell codec's speed."""
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    return {
        "asks": n,
        "unix": runner(_measure("unix", n)),
        "tcp": runner(_measure("tcp", n)),
        "codec_batch_4096": measure_codec(),
    }


if __name__ == "__main__":
    print(json.dumps(measure_forwarding(), indent=2))
