"""``agentd serve``: run the gateway on one port until Ctrl-C or SIGTERM, then drain."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["serve"]


def serve(
    config: Annotated[Path | None, typer.Option(help="YAML settings file.")] = None,
    host: Annotated[str | None, typer.Option(help="Address to bind (default 127.0.0.1).")] = None,
    port: Annotated[
        int | None, typer.Option(help="Port to bind, 0 for any (default 8080).")
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(help="PEM certificate: serve TLS (ALPN h2, http/1.1).")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key for --tls-cert.")] = None,
    tls_client_ca: Annotated[
        Path | None, typer.Option(help="PEM CA: require client certificates (mTLS).")
    ] = None,
    http3: Annotated[
        bool | None,
        typer.Option("--http3/--no-http3", help="Also serve HTTP/3 over QUIC (needs TLS)."),
    ] = None,
    plugins: Annotated[Path | None, typer.Option(help="Plugin folder (default ./plugins).")] = None,
    etcd: Annotated[str | None, typer.Option(help="etcd URL for clustering.")] = None,
    grace: Annotated[
        float | None, typer.Option(help="Seconds in-flight calls get on shutdown.")
    ] = None,
) -> None:
    """Serve agents, models and tools on one port (gRPC, gRPC-Web, Connect, HTTP)."""
    from pydantic import ValidationError
    from rich.console import Console

    from agentd.server import EnvoyProcess, StartupError
    from agentd.settings import load_settings

    console = Console(highlight=False)
    try:
        settings = load_settings(
            config=config,
            host=host,
            port=port,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_client_ca=tls_client_ca,
            http3=http3,
            plugins=plugins,
            etcd=etcd,
            grace_period_s=grace,
        )
    except (ValidationError, ValueError) as exc:
        console.print(f"[red]error:[/red] invalid settings: {exc}")
        raise typer.Exit(2) from None
    for path in (settings.tls_cert, settings.tls_key, settings.tls_client_ca):
        if path is not None and not path.is_file():
            console.print(f"[red]error:[/red] {path} is not a readable file")
            raise typer.Exit(2)

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    from agentd.cli.tools import ensure_tools

    ensure_tools(settings, console)

    envoy = EnvoyProcess(settings)
    try:
        listening = envoy.start()
    except StartupError as exc:
        console.print(f"[red]error:[/red] could not start: {exc}")
        raise typer.Exit(1) from None
    from agentd.cli.banner import banner

    console.print(banner(listening, settings.auth_tokens != []), markup=False, soft_wrap=True)

    while not stop.wait(0.2):
        if not envoy.running:
            console.print("[red]error:[/red] the server process exited unexpectedly")
            raise typer.Exit(1)
    console.print(f"draining: finishing in-flight calls (up to {settings.grace_period_s:g}s)")
    finished = envoy.drain(settings.grace_period_s)
    envoy.stop()
    console.print("stopped" if finished else "stopped; some calls were cut off by the grace period")
