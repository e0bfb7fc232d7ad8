"""Baseline: one asyncio task and one ``asyncio.Queue`` mailbox per agent, each calling
ONNX Runtime unbatched (no micro-batcher, no runtime). Prints one JSON line.

Run: ``python -m agentd_bench.baselines.swarm_tasks --agents 100000``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time

import numpy as np

from agentd_bench.baselines.swarm_model import decision_session


async def run(agents: int) -> dict:
    session = decision_session()
    features = np.random.default_rng(0).standard_normal((agents, 16), dtype=np.float32)
    results: asyncio.Queue[tuple[int, int]] = asyncio.Queue()

    async def agent(index: int, mailbox: asyncio.Queue) -> None:
        row = await mailbox.get()
        (action,) = session.run(["action"], {"features": row})
        await results.put((index, int(action[0])))

    started = time.perf_counter()
    mailboxes: list[asyncio.Queue[np.ndarray]] = [asyncio.Queue() for _ in range(agents)]
    tasks = [asyncio.create_task(agent(i, m)) for i, m in enumerate(mailboxes)]
    for index, mailbox in enumerate(mailboxes):
        mailbox.put_nowait(features[index : index + 1])
    seen = set()
    for _ in range(agents):
        index, _action = await results.get()
        seen.add(index)
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - started
    return {
        "agents": agents,
        "distinct_results": len(seen),
        "wall_s": round(wall, 3),
        "decisions_per_s": round(agents / wall, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--agents", type=int, default=100_000)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.agents))))


if __name__ == "__main__":
    main()
