"""``agentd call``: invoke an agent over Connect JSON, for humans at a terminal."""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

if TYPE_CHECKING:
    import httpx

__all__ = ["answer_json", "call", "not_agentd"]

_SERVICE = "agentd.v1.AgentService"
MAX_TIMEOUT_S = 86_400.0  # one day: longer is a typo, and overflows a deadline header


def call(
    agent: Annotated[str, typer.Argument(help="Agent address: TYPE or TYPE/ID.")],
    text: Annotated[str, typer.Argument(help="Message text; '-' reads standard input.")] = "",
    stream: Annotated[
        bool, typer.Option("--stream", help="Use InvokeStream, print events as they come.")
    ] = False,
    url: Annotated[str, typer.Option(help="Gateway URL.")] = "http://127.0.0.1:8080",
    token: Annotated[str | None, typer.Option(help="Bearer token \\[env: AGENTD_TOKEN].")] = None,
    timeout: Annotated[
        float, typer.Option(help="Deadline in seconds (more than 0, at most 86400).")
    ] = 30.0,
    insecure: Annotated[
        bool, typer.Option("--insecure", "-k", help="Skip TLS verification.")
    ] = False,
) -> None:
    """Send TEXT to AGENT and print the reply."""
    import httpx

    if not (math.isfinite(timeout) and 0 < timeout <= MAX_TIMEOUT_S):
        typer.echo(
            f"error: --timeout must be a number of seconds above 0 and at most"
            f" {MAX_TIMEOUT_S:.0f}, not {timeout:g}",
            err=True,
        )
        raise typer.Exit(2)
    if text == "-":
        text = sys.stdin.read()
    token = token or os.environ.get("AGENTD_TOKEN")
    deadline_ms = str(max(1, math.ceil(timeout * 1000)))
    headers = {"connect-protocol-version": "1", "connect-timeout-ms": deadline_ms}
    if token:
        headers["authorization"] = f"Bearer {token}"
    body = json.dumps({"agent": agent, "message": {"text": text}}).encode()
    try:
        with httpx.Client(base_url=url, timeout=timeout + 5, verify=not insecure) as client:
            if stream:
                _call_stream(client, url, body, headers)
            else:
                _call_unary(client, url, body, headers)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        typer.echo(f"error: cannot reach {url}: {exc}", err=True)
        raise typer.Exit(1) from None


def _call_unary(client, url: str, body: bytes, headers: dict[str, str]) -> None:
    response = client.post(
        f"/{_SERVICE}/Invoke", content=body, headers={**headers, "content-type": "application/json"}
    )
    data = answer_json(response, url)
    if not isinstance(data, dict):
        not_agentd(url, response)
    if response.status_code != 200:
        _fail(data, response.status_code)
    message = data.get("message")
    if not isinstance(message, dict):
        not_agentd(url, response)
    typer.echo(message.get("text", ""))


def _call_stream(client, url: str, body: bytes, headers: dict[str, str]) -> None:
    framed = struct.pack(">BI", 0, len(body)) + body
    headers = {**headers, "content-type": "application/connect+json"}
    with client.stream("POST", f"/{_SERVICE}/InvokeStream", content=framed, headers=headers) as r:
        if r.status_code != 200:
            r.read()
            error = answer_json(r, url)
            if not isinstance(error, dict):
                not_agentd(url, r)
            _fail(error, r.status_code)
        if not r.headers.get("content-type", "").startswith("application/connect+json"):
            not_agentd(url, r)
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


def answer_json(response: httpx.Response, url: str) -> Any:
    """The JSON body of an agentd answer. A body that is not JSON means something other
    than agentd answered at ``url``: say so and end the command (exit 1)."""
    try:
        return json.loads(response.content)
    except ValueError:
        not_agentd(url, response)


def not_agentd(url: str, response: httpx.Response) -> NoReturn:
    content_type = response.headers.get("content-type") or "none"
    detail = ""
    if content_type.startswith("text/plain"):  # e.g. a proxy's own error; worth a look
        text = " ".join(response.content[:200].decode(errors="replace").split())
        detail = f": {text}" if text else ""
    typer.echo(
        f"error: {url} did not answer like an agentd server"
        f" (HTTP {response.status_code}, content-type {content_type}){detail}",
        err=True,
    )
    raise typer.Exit(1)


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
