"""Baseline: FastAPI on uvicorn serving the Connect JSON Invoke route with the echo logic.

Run: ``python -m agentd_bench.baselines.fastapi_server --port P``. One process, uvloop,
httptools when installed, no access log; HTTP/1.1 on 127.0.0.1 until SIGTERM.
"""

from __future__ import annotations

import argparse
import importlib.util
import json

from fastapi import FastAPI, Request, Response

__all__ = ["app", "main"]

app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)


@app.post("/agentd.v1.AgentService/Invoke")
async def invoke(request: Request) -> Response:
    # Parse, echo and serialise by hand, like a Connect JSON handler does: no pydantic model,
    # so the baseline does no more work than agentd's path.
    try:
        body = json.loads(await request.body())
        message = body.get("message") or {}
    except (ValueError, AttributeError):
        return Response(
            b'{"code":"invalid_argument","message":"body is not a JSON object"}',
            status_code=400,
            media_type="application/json",
        )
    reply = {"agent": "echo/default", "message": message}
    return Response(json.dumps(reply).encode(), media_type="application/json")


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        access_log=False,
        log_level="warning",
        workers=1,
    )


if __name__ == "__main__":
    main()
