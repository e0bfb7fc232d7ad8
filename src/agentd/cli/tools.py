"""``agentd tools``: build the tool component; list and call the tools of a running server."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from rich.console import Console

    from agentd.settings import Settings
    from agentd.tools.build import BuildResult

__all__ = ["ensure_tools", "settings_or_exit", "tools"]

tools = typer.Typer(
    name="tools",
    help="Sandboxed tools: build the WebAssembly component, list and call tools.",
    no_args_is_help=True,
)

_CALL_PATH = "/agentd.v1.AgentService/CallTool"


def _build(settings: Settings, console: Console, *, force: bool = False) -> BuildResult:
    """Build (or find) the artefact, telling progress on ``console`` (a spinner on a
    terminal, one line per step otherwise)."""
    from agentd.tools.build import build_tools

    started = time.perf_counter()

    def progress(step: str) -> None:
        console.print(f"  tools [{time.perf_counter() - started:5.1f}s] {step}", markup=False)

    with console.status("building tools", spinner="dots"):
        return build_tools(
            settings.tools_cache_dir, settings.plugins / "tools", progress=progress, force=force
        )


def settings_or_exit(**flags: Any) -> Settings:
    """``load_settings(**flags)``, or one ``error: invalid settings: ...`` line on stderr and
    exit 2 when a flag, an ``AGENTD_*`` variable or the config file holds a bad value."""
    from agentd.errors import ConfigError
    from agentd.settings import load_settings

    try:
        return load_settings(**flags)
    except ConfigError as exc:
        typer.echo(f"error: invalid settings: {exc.message}", err=True)
        raise typer.Exit(2) from None


def ensure_tools(settings: Settings, console: Console) -> None:
    """For ``agentd serve``: build the tool artefact when it is missing (first start, or the
    tool files changed). A failed build is reported and the server starts without tools."""
    from agentd.tools import ToolBuildError
    from agentd.tools.build import find_artefact

    if find_artefact(settings.tools_cache_dir, settings.plugins / "tools") is not None:
        return
    console.print(
        "building the tool sandbox (first start, or tool files changed; cached afterwards)"
    )
    try:
        result = _build(settings, console)
    except ToolBuildError as exc:
        console.print(f"[red]error:[/red] tools: {exc}; serving without tools")
        return
    for error in result.artefact.load_errors:
        console.print(f"[yellow]warning:[/yellow] tools: {error.file}: {error.message}")


@tools.command("build")
def build(
    plugins: Annotated[Path | None, typer.Option(help="Plugin folder (default ./plugins).")] = None,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Artefact cache \\[env: AGENTD_TOOLS_CACHE_DIR].")
    ] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even when a cached build exists.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Compile the built-in tools and PLUGINS/tools/*.py into a precompiled component.

    Cached by content hash: unchanged files cost nothing.
    """
    from rich.console import Console
    from rich.table import Table

    from agentd.tools import ToolBuildError
    from agentd.tools.build import CacheDirError

    settings = settings_or_exit(plugins=plugins, tools_cache_dir=cache_dir)
    console = Console(stderr=json_out, highlight=False)
    try:
        result = _build(settings, console, force=force)
    except CacheDirError as exc:  # a bad --cache-dir (or AGENTD_TOOLS_CACHE_DIR)
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except ToolBuildError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    artefact = result.artefact
    if json_out:
        typer.echo(json.dumps({**artefact.to_json(), "built": result.built}, indent=2))
        return
    where = settings.tools_cache_dir
    count = len(artefact.components)
    if result.built:
        console.print(
            f"built {result.num_built} of {count} components in {where} in {result.seconds:.1f} s"
        )
    else:
        checked_ms = result.seconds * 1000
        console.print(f"up to date: {count} components in {where} (checked in {checked_ms:.0f} ms)")
    table = Table("tool", "parameters", "description")
    for spec in artefact.tools:
        params = ", ".join(spec.parameters.get("properties", {}))
        table.add_row(spec.name, params, spec.description.split("\n\n")[0].replace("\n", " "))
    console.print(table)
    for error in artefact.load_errors:
        console.print(f"[yellow]not loaded:[/yellow] {error.file}: {error.message}")


def _client_headers(token: str | None) -> dict[str, str]:
    token = token or os.environ.get("AGENTD_TOKEN")
    return {"authorization": f"Bearer {token}"} if token else {}


@tools.command("list")
def list_tools(
    url: Annotated[str, typer.Option(help="Gateway URL.")] = "http://127.0.0.1:8080",
    token: Annotated[str | None, typer.Option(help="Bearer token \\[env: AGENTD_TOKEN].")] = None,
) -> None:
    """List the tools of a running server (GET /v1/tools)."""
    import httpx

    from agentd.cli.call import answer_json, not_agentd

    try:
        response = httpx.get(f"{url}/v1/tools", headers=_client_headers(token), timeout=30)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        typer.echo(f"error: cannot reach {url}: {exc}", err=True)
        raise typer.Exit(1) from None
    body = answer_json(response, url)
    if response.status_code != 200:
        typer.echo(f"error: {response.status_code} {response.text}", err=True)
        raise typer.Exit(1)
    try:
        lines = [
            f"{tool['name']}({', '.join(tool['parameters'].get('properties', {}))})"
            for tool in body["tools"]
        ]
    except (KeyError, TypeError, AttributeError):
        not_agentd(url, response)
    if not body.get("available", True):
        typer.echo(f"tools unavailable: {body.get('reason', '')}", err=True)
    for line in lines:
        typer.echo(line)


@tools.command("call")
def call_tool(
    name: Annotated[str, typer.Argument(help="Tool name.")],
    arguments: Annotated[str, typer.Argument(help="Keyword arguments as a JSON object.")] = "{}",
    url: Annotated[str, typer.Option(help="Gateway URL.")] = "http://127.0.0.1:8080",
    token: Annotated[str | None, typer.Option(help="Bearer token \\[env: AGENTD_TOKEN].")] = None,
) -> None:
    """Call a tool on a running server and print its JSON result."""
    import httpx

    from agentd.cli.call import answer_json, not_agentd

    try:
        response = httpx.post(
            f"{url}{_CALL_PATH}",
            json={"name": name, "argumentsJson": arguments},
            headers=_client_headers(token),
            timeout=60,
        )
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        typer.echo(f"error: cannot reach {url}: {exc}", err=True)
        raise typer.Exit(1) from None
    body = answer_json(response, url)
    if not isinstance(body, dict):
        not_agentd(url, response)
    if response.status_code != 200:
        typer.echo(f"error: {body.get('code')}: {body.get('message')}", err=True)
        raise typer.Exit(1)
    typer.echo(body.get("resultJson", "null"))
