"""Baseline: one OS thread per agent with a ``queue.Queue`` mailbox (the seed's Python
comparison), each calling ONNX Runtime unbatched. Prints one JSON line.

Run: ``python -m agentd_bench.baselines.swarm_threads --agents 10000``.
"""

from __future__ import annotations

import argparse
import json
import queue
import resource
import threading
import time

import numpy as np

from agentd_bench.baselines.swarm_model import decision_session


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--agents", type=int, default=10_000)
    args = parser.parse_args()
    session = decision_session()
    features = np.random.default_rng(0).standard_normal((args.agents, 16), dtype=np.float32)
    results: queue.Queue[tuple[int, int]] = queue.Queue()

    def agent(index: int, mailbox: queue.Queue) -> None:
        row = mailbox.get()
        (action,) = session.run(["action"], {"features": row})
        results.put((index, int(action[0])))

    threading.stack_size(256 * 1024)
    started = time.perf_counter()
    threads: list[threading.Thread] = []
    mailboxes: list[queue.Queue] = []
    failed_at = None
    error = None
    for index in range(args.agents):
        mailbox: queue.Queue = queue.Queue()
        thread = threading.Thread(target=agent, args=(index, mailbox), daemon=True)
        try:
            thread.start()
        except RuntimeError as exc:  # "can't start new thread": the OS limit
            failed_at, error = index, str(exc)
            break
        threads.append(thread)
        mailboxes.append(mailbox)
    for index, mailbox in enumerate(mailboxes):
        mailbox.put(features[index : index + 1])
    seen = set()
    for _ in range(len(threads)):
        index, _action = results.get()
        seen.add(index)
    wall = time.perf_counter() - started
    print(
        json.dumps(
            {
                "agents_requested": args.agents,
                "agents_started": len(threads),
                "failed_at": failed_at,
                "error": error,
                "distinct_results": len(seen),
                "wall_s": round(wall, 3),
                "decisions_per_s": round(len(seen) / wall, 1) if wall else 0.0,
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
