"""``agentd models``: list, load and unload models on a running server."""

from __future__ import annotations

import os
from typing import Annotated
from urllib.parse import quote

import typer

__all__ = ["models"]


def models(
    action: Annotated[str, typer.Argument(help="list, load or unload.")] = "list",
    name: Annotated[
        str | None,
        typer.Argument(help="Model name, tensor or language model (for load and unload)."),
    ] = None,
    url: Annotated[str, typer.Option(help="Gateway URL.")] = "http://127.0.0.1:8080",
    token: Annotated[str | None, typer.Option(help="Bearer token \\[env: AGENTD_TOKEN].")] = None,
) -> None:
    """Show the models of a running server (tensor models and language models), or load /
    unload one: a tensor model or a language model (load reloads a served model: the new
    version is built beside the old, which serves until it is ready and keeps serving if
    it fails; unload lets running calls and streams finish)."""
    import httpx
    from rich.console import Console
    from rich.table import Table

    from agentd.cli.call import answer_json, not_agentd

    token = token or os.environ.get("AGENTD_TOKEN")
    headers = {"authorization": f"Bearer {token}"} if token else {}
    if action not in ("list", "load", "unload"):
        typer.echo(f"error: unknown action {action!r}; use list, load or unload", err=True)
        raise typer.Exit(2)
    if action != "list" and not name:
        typer.echo(f"error: {action} needs a model name", err=True)
        raise typer.Exit(2)
    if name in (".", ".."):
        typer.echo(f"error: {name!r} is not a model name", err=True)
        raise typer.Exit(2)
    language_models = None
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
            if action == "list":
                response = client.post("/v2/repository/index")
                language_models = client.get("/v1/models")
            else:
                assert name  # checked above: load and unload need one
                # A name is one path segment: '?', '/' or '..' in it must not change the route.
                response = client.post(f"/v2/repository/models/{quote(name, safe='')}/{action}")
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        typer.echo(f"error: cannot reach {url}: {exc}", err=True)
        raise typer.Exit(1) from None
    if response.status_code != 200:
        body = answer_json(response, url)
        message = body.get("error", response.text) if isinstance(body, dict) else response.text
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(1)
    if action != "list":
        typer.echo(f"{name}: {action}ed")
        return
    table = Table("model", "version", "state", "reason", title="tensor models (KServe v2)")
    try:
        for item in answer_json(response, url):
            table.add_row(item["name"], item["version"], item["state"], item.get("reason", ""))
    except (KeyError, TypeError, AttributeError):
        not_agentd(url, response)
    Console().print(table)
    if language_models is not None and language_models.status_code == 200:
        table = Table("model", "platform", "context", title="language models (OpenAI API)")
        try:
            for item in language_models.json().get("data", []):
                context = str(item.get("context_length", ""))
                table.add_row(item["id"], item.get("platform", ""), context)
        except (ValueError, KeyError, TypeError, AttributeError):
            return  # the tensor models were listed; an odd /v1/models answer adds nothing
        Console().print(table)
