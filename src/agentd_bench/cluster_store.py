"""One swarm run on a chosen state store, for ``agentd bench cluster``'s store section:
``python -m agentd_bench.cluster_store --agents N --store sqlite|redis [--redis-url URL]``
prints the swarm's result as JSON.

``agentd swarm`` has no store option (it persists to SQLite), so this runs the same swarm
(:func:`agentd.swarm.run.run_swarm`, one process) with its node's settings changed only in
the store: ``state_store`` and ``redis_url``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m agentd_bench.cluster_store")
    parser.add_argument("--agents", type=int, required=True)
    parser.add_argument("--store", choices=("sqlite", "redis"), required=True)
    parser.add_argument("--redis-url")
    args = parser.parse_args(argv)
    if args.store == "redis" and not args.redis_url:
        parser.error("--store redis needs --redis-url")

    import uvloop

    from agentd.swarm import run
    from agentd.swarm.gc_policy import many_objects_gc

    swarm_settings = run._swarm_settings

    def settings(*given: Any, **options: Any) -> Any:
        chosen = swarm_settings(*given, **options)
        if args.store == "redis":
            chosen = chosen.model_copy(update={"state_store": "redis", "redis_url": args.redis_url})
        return chosen

    run._swarm_settings = settings  # the store is all that differs from agentd swarm
    with many_objects_gc():
        result = uvloop.run(run.run_swarm(args.agents))
    print(json.dumps({**result.as_dict(), "store": args.store}))


if __name__ == "__main__":
    main()
