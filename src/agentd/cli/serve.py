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
    etcd: Annotated[
        str | None,
        typer.Option(help="etcd URL for clustering (not available yet: giving it is an error)."),
    ] = None,
    grace: Annotated[
        float | None, typer.Option(help="Seconds in-flight calls get on shutdown.")
    ] = None,
) -> None:
    """Serve agents, models and tools on one port (gRPC, gRPC-Web, Connect, HTTP)."""
    from rich.console import Console
    from rich.markup import escape

    from agentd.errors import ConfigError, StartupError
    from agentd.server import EnvoyProcess, preflight
    from agentd.settings import load_settings

    console = Console(highlight=False)

    def fail(message: str, code: int) -> typer.Exit:
        # soft_wrap: one line however long, so the cause is not split across lines
        console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
        return typer.Exit(code)

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
    except ConfigError as exc:  # one line naming each bad field, or the config file
        raise fail(f"invalid settings: {exc.message}", 2) from None
    for path in (settings.tls_cert, settings.tls_key, settings.tls_client_ca):
        if path is not None and not path.is_file():
            raise fail(f"{path} is not a readable file", 2)
    if settings.etcd is not None:
        where = "--etcd" if etcd is not None else "etcd (config file or AGENTD_ETCD)"
        raise fail(f"{where}: clustering is not available in this version of agentd", 2)
    try:
        # Resolve the host, read the TLS files, open the state store and try the port
        # before Envoy starts, so a bad setting is one line naming it.
        settings = preflight(settings)
    except ConfigError as exc:
        raise fail(str(exc), 2) from None
    except StartupError as exc:
        raise fail(str(exc), 1) from None

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    from agentd.cli.tools import ensure_tools

    ensure_tools(settings, console)

    envoy = EnvoyProcess(settings)
    try:
        listening = envoy.start()
    except StartupError as exc:
        raise fail(f"could not start: {exc}", 1) from None
    from agentd.cli.banner import banner

    console.print(
        banner(listening, settings.auth_tokens != [], settings.plugins),
        markup=False,
        soft_wrap=True,
    )
    if listening.health_port is not None:
        host = listening.host if listening.host not in ("0.0.0.0", "::") else "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        console.print(
            f"health checks: http://{host}:{listening.health_port}/healthz (own connections)",
            markup=False,
        )
    if listening.max_connections < settings.max_connections:
        console.print(
            f"note: max_connections lowered to {listening.max_connections:,} under the"
            f" open-file limit ({listening.open_files:,})",
            markup=False,
            soft_wrap=True,
        )

    while not stop.wait(0.2):
        if not envoy.running:
            envoy.stop()  # reaps it and removes its admin socket's folder
            console.print("[red]error:[/red] the server process exited unexpectedly")
            raise typer.Exit(1)
    console.print(f"draining: finishing in-flight calls (up to {settings.grace_period_s:g}s)")
    finished = envoy.drain(settings.grace_period_s)
    envoy.stop()
    console.print("stopped" if finished else "stopped; some calls were cut off by the grace period")
