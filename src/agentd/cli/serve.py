"""``agentd serve``: run the gateway on one port until Ctrl-C or SIGTERM, then drain."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from rich.console import Console

    from agentd.server import EnvoyProcess, Listening
    from agentd.settings import Settings

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
        typer.Option(help="etcd URL (http://host:2379): join the cluster it coordinates."),
    ] = None,
    cluster: Annotated[
        str | None, typer.Option(help="Cluster name in etcd (default agentd).")
    ] = None,
    node_id: Annotated[
        str | None, typer.Option(help="This node's id in the cluster (default host-port).")
    ] = None,
    advertise: Annotated[
        str | None,
        typer.Option(help="HOST:PORT other nodes reach this node at (its peer listener)."),
    ] = None,
    zone: Annotated[str | None, typer.Option(help="This node's zone (for zone failover).")] = None,
    processes: Annotated[
        int | None,
        typer.Option(
            help="Node processes sharing the port (default 1); agents are spread over them."
        ),
    ] = None,
    grace: Annotated[
        float | None, typer.Option(help="Seconds in-flight calls get on shutdown.")
    ] = None,
    log_format: Annotated[
        str | None,
        typer.Option(
            help="text (default) or json: one JSON object per line, with trace ids when traced."
        ),
    ] = None,
) -> None:
    """Serve agents, models and tools on one port (gRPC, gRPC-Web, Connect, HTTP)."""
    from rich.console import Console
    from rich.markup import escape

    from agentd.errors import ConfigError, StartupError
    from agentd.server import EnvoyProcess, preflight
    from agentd.server.preflight import check_etcd
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
            cluster=cluster,
            node_id=node_id,
            advertise=advertise,
            zone=zone,
            processes=processes,
            grace_period_s=grace,
            log_format=log_format,
        )
    except ConfigError as exc:  # one line naming each bad field, or the config file
        raise fail(f"invalid settings: {exc.message}", 2) from None
    from agentd.observability.logs import setup_logging

    setup_logging(settings)  # this process's own records; each node sets up its own
    if "plugins" in settings.model_fields_set and not settings.plugins.is_dir():
        # Given, it is meant to be used: a typo must not serve the built-ins only, silently.
        # (The default ./plugins may be absent: the banner says so.)
        where = "--plugins" if plugins is not None else "plugins (config file or AGENTD_PLUGINS)"
        what = "is not a directory" if settings.plugins.exists() else "does not exist"
        raise fail(f"{where}: {settings.plugins} {what}", 2)
    for path in (settings.tls_cert, settings.tls_key, settings.tls_client_ca):
        if path is not None and not path.is_file():
            raise fail(f"{path} is not a readable file", 2)
    if settings.etcd is not None:
        where = "--etcd" if etcd is not None else "etcd (config file or AGENTD_ETCD)"
        try:
            check_etcd(settings.etcd)
        except ConfigError as exc:
            raise fail(f"{where}: {exc.message}", 2) from None
    if settings.processes > 1:
        # QUIC: a connection's packets could reach another process (Envoy steers them
        # among its own workers only). etcd: each process would be a node of its own.
        for given, why in ((settings.http3, "http3"), (settings.etcd is not None, "etcd")):
            if given:
                raise fail(f"processes {settings.processes}: not available with {why}", 2)
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

    if settings.processes > 1:
        code = _serve_processes(settings, console, stop)
        if code:
            raise typer.Exit(code)
        return
    envoy = EnvoyProcess(settings)
    with _LoadedSummary() as summary:
        try:
            listening = envoy.start()
        except StartupError as exc:
            raise fail(f"could not start: {exc}", 1) from None
        _print_banner(console, settings, listening, summary.read())
    while not stop.wait(0.2):
        if not envoy.running:
            envoy.stop()  # reaps it and removes its admin socket's folder
            console.print("[red]error:[/red] the server process exited unexpectedly")
            raise typer.Exit(1)
    console.print(f"draining: finishing in-flight calls (up to {settings.grace_period_s:g}s)")
    finished = envoy.drain(settings.grace_period_s)
    envoy.stop()
    console.print("stopped" if finished else "stopped; some calls were cut off by the grace period")


# agentd.gateway.plugins_api.LOADED_FILE_ENV (not imported: it would load the whole node here)
_LOADED_FILE_ENV = "AGENTD_LOADED_FILE"


class _LoadedSummary:
    """The node's one-line summary of what it loaded (agents, tools, models): while the
    block runs, the Envoy started gets ``AGENTD_LOADED_FILE`` naming a file in a private
    folder, which its gateway writes once its node has started; :meth:`read` waits for it
    a little (with TLS, start() returns before the node has started) and gives the line, or
    None. Only the first Envoy of ``--processes N`` is given the file (one line, not N)."""

    def __enter__(self) -> _LoadedSummary:
        import os
        import tempfile

        self._folder = tempfile.mkdtemp(prefix="agentd-loaded-")
        self._path = os.path.join(self._folder, "loaded")
        self._previous = os.environ.get(_LOADED_FILE_ENV)
        os.environ[_LOADED_FILE_ENV] = self._path  # EnvoyProcess.start passes os.environ on
        return self

    def release(self) -> None:
        """Give the later Envoys (other processes, restarts) no file."""
        import os

        if os.environ.get(_LOADED_FILE_ENV) != self._path:
            return
        if self._previous is None:
            os.environ.pop(_LOADED_FILE_ENV, None)
        else:
            os.environ[_LOADED_FILE_ENV] = self._previous

    def read(self, timeout: float = 5.0) -> str | None:
        import time

        self.release()
        end = time.monotonic() + timeout
        while True:
            try:
                with open(self._path, encoding="utf-8") as file:
                    return file.read().strip() or None
            except OSError:
                if time.monotonic() > end:
                    return None
            time.sleep(0.02)

    def __exit__(self, *exc: object) -> None:
        import shutil

        self.release()
        shutil.rmtree(self._folder, ignore_errors=True)


def _print_banner(
    console: Console, settings: Settings, listening: Listening, loaded: str | None = None
) -> None:
    from agentd.cli.banner import banner

    console.print(
        banner(listening, settings.auth_tokens != [], settings.plugins, settings.processes, loaded),
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


class _EnvoyChild:
    """One of ``--processes N``: an Envoy of its own identity (node id, peer socket), started
    again as a new Envoy with the same settings when the supervisor restarts it."""

    def __init__(self, name: str, settings: Settings) -> None:
        self.name = name
        self.settings = settings
        self.envoy: EnvoyProcess | None = None
        self.listening: Listening | None = None

    @property
    def pid(self) -> int | None:
        return None if self.envoy is None else self.envoy.pid

    def start(self) -> None:
        from agentd.server import EnvoyProcess

        self.envoy = EnvoyProcess(self.settings)
        self.listening = self.envoy.start()

    def poll(self) -> int | None:
        return None if self.envoy is None else self.envoy.poll()

    def kill(self) -> None:
        if self.envoy is not None:
            self.envoy.kill()

    def drain(self, grace: float) -> bool:
        return True if self.envoy is None else self.envoy.drain(grace)

    def stop(self) -> None:
        if self.envoy is not None:
            self.envoy.stop()


def _serve_processes(settings: Settings, console: Console, stop: threading.Event) -> int:
    """``--processes N``: N Envoys on the port (SO_REUSEPORT among them; the port was
    checked without it by the pre-flight), each a node with its identity, supervised until
    ``stop`` is set; then all drain at once. Returns the exit status."""
    from concurrent.futures import ThreadPoolExecutor

    from rich.markup import escape

    from agentd.cluster.supervisor import Supervisor, local_peers
    from agentd.errors import StartupError

    count = settings.processes
    peers = local_peers(count)
    children: list[_EnvoyChild] = []
    summary = _LoadedSummary().__enter__()  # closed in the finally below
    try:
        port, health_port = settings.port, settings.health_port
        for name, endpoint in zip(peers.ids, peers.endpoints, strict=True):
            # Port 0: the first process resolves it; the others bind the same one.
            child = _EnvoyChild(
                name,
                settings.model_copy(
                    update={
                        "port": port,
                        "health_port": health_port,
                        "node_id": name,
                        "peer_listen": endpoint,
                        "peers": peers.peers,
                    }
                ),
            )
            children.append(child)
            try:
                child.start()
            except StartupError as exc:
                console.print(
                    f"[red]error:[/red] could not start: {escape(str(exc))}", soft_wrap=True
                )
                return 1
            assert child.listening is not None
            port, health_port = child.listening.port, child.listening.health_port
            summary.release()  # the first process writes the summary, the others not
        assert children[0].listening is not None
        _print_banner(console, settings, children[0].listening, summary.read())
        console.print(
            "processes: " + ", ".join(f"{c.name} (pid {c.pid})" for c in children), markup=False
        )
        supervisor = Supervisor(children, log=lambda line: console.print(line, markup=False))
        while not stop.wait(0.2):
            supervisor.check()
        grace = settings.grace_period_s
        console.print(f"draining: finishing in-flight calls (up to {grace:g}s)")
        with ThreadPoolExecutor(count, thread_name_prefix="drain") as pool:
            finished = all(pool.map(lambda c: c.drain(grace), children))
            # SIGTERM to each by its PID, then wait (the app's lifespan shutdown flushes state)
            list(pool.map(lambda c: c.stop(), children))
        console.print(
            "stopped" if finished else "stopped; some calls were cut off by the grace period"
        )
        return 0
    finally:
        for child in children:
            child.kill()  # only those still running: a failed start, an error above
        peers.remove()
        summary.__exit__()
