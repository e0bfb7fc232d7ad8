"""``agentd call``: invoke an agent over Connect JSON, for humans at a terminal."""

from __future__ import annotations

import json
import os
import struct
import sys
from typing import Annotated

import typer

__all__ = ["call"]

_SERVICE = "agentd.v1.AgentService"


def call(
    agent: Annotated[str, typer.Argument(help="Agent address: TYPE or TYPE/ID.")],
    text: Annotated[str, typer.Argument(help="Message text; '-' reads standard input.")] = "",
    stream: Annotated[
        bool, typer.Option("--stream", help="Use InvokeStream, print events as they come.")
    ] = False,
    url: Annotated[str, typer.Option(help="Gateway URL.")] = "http://127.0.0.1:8080",
    token: Annotated[str | None, typer.Option(help="Bearer token [env: AGENTD_TOKEN].")] = None,
    timeout: Annotated[float, typer.Option(help="Deadline in seconds.")] = 30.0,
    insecure: Annotated[
        bool, typer.Option("--insecure", "-k", help="Skip TLS verification.")
    ] = False,
) -> None:
    """Send TEXT to AGENT and print the reply."""
    import httpx

    if text == "-":
        text = sys.stdin.read()
    token = token or os.environ.get("AGENTD_TOKEN")
    headers = {"connect-protocol-version": "1", "connect-timeout-ms": str(int(timeout * 1000))}
    if token:
        headers["authorization"] = f"Bearer {token}"
    body = json.dumps({"agent": agent, "message": {"text": text}}).encode()
    try:
        with httpx.Client(base_url=url, timeout=timeout + 5, verify=not insecure) as client:
            if stream:
                _call_stream(client, body, headers)
            else:
                _call_unary(client, body, headers)
    except httpx.HTTPError as exc:
        typer.echo(f"error: cannot reach {url}: {exc}", err=True)
        raise typer.Exit(1) from None


def _call_unary(client, body: bytes, headers: dict[str, str]) -> None:
    response = client.post(
        f"/{_SERVICE}/Invoke", content=body, headers={**headers, "content-type": "application/json"}
    )
    data = _json(response.content)
    if response.status_code != 200:
        _fail(data, response.status_code)
    message = data.get("message", {})
    typer.echo(message.get("text", ""))


def _call_stream(client, body: bytes, headers: dict[str, str]) -> None:
    framed = struct.pack(">BI", 0, len(body)) + body
    headers = {**headers, "content-type": "application/connect+json"}
    with client.stream("POST", f"/{_SERVICE}/InvokeStream", content=framed, headers=headers) as r:
        if r.status_code != 200:
            _fail(_json(r.read()), r.status_code)
        buffer = b""
        for chunk in r.iter_bytes():
            buffer += chunk
            while len(buffer) >= 5:
                flags, size = struct.unpack(">BI", buffer[:5])
                if len(buffer) < 5 + size:
                    break
                payload, buffer = buffer[5 : 5 + size], buffer[5 + size :]
                data = _json(payload)
                if flags & 0x02:  # end of stream, maybe with an error
                    if "error" in data:
                        typer.echo()
                        _fail(data["error"], 200)
                    typer.echo()
                    return
                if "token" in data:
                    typer.echo(data["token"], nl=False)
                else:
                    typer.echo(data.get("message", {}).get("text", ""))


def _json(raw: bytes) -> dict:
    try:
        data = json.loads(raw or b"{}")
    except ValueError:
        return {"message": raw.decode(errors="replace")}
    return data if isinstance(data, dict) else {}


def _fail(error: dict, status: int) -> None:
    code = error.get("code", f"http {status}")
    typer.echo(f"error: {code}: {error.get('message', '')}", err=True)
    raise typer.Exit(1)
