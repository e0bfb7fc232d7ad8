"""Baseline: grpc.aio's native server with the echo handler, one process, uvloop if present.

Run: ``python -m agentd_bench.baselines.grpc_aio_server --port P``. Serves plaintext HTTP/2
on 127.0.0.1 until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc

from agentd.v1 import agent_pb2 as pb
from agentd.v1 import agent_pb2_grpc

__all__ = ["EchoService", "main", "serve"]


class EchoService(agent_pb2_grpc.AgentServiceServicer):
    """The same reply agentd's built-in ``echo`` agent gives, without the actor runtime."""

    async def Invoke(
        self, request: pb.InvokeRequest, context: grpc.aio.ServicerContext
    ) -> pb.InvokeResponse:
        return pb.InvokeResponse(agent="echo/default", message=request.message)


async def serve(port: int) -> None:
    server = grpc.aio.server()
    agent_pb2_grpc.add_AgentServiceServicer_to_server(EchoService(), server)
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise SystemExit(f"cannot bind 127.0.0.1:{port}")
    await server.start()
    print(f"grpc.aio listening on 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.port))
    else:
        uvloop.run(serve(args.port))


if __name__ == "__main__":
    main()
