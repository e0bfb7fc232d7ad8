"""Checks ``agentd serve`` runs before starting Envoy, so a bad setting fails in one line.

Each check raises :class:`~agentd.errors.ConfigError` (a setting is wrong: exit 2) or
:class:`~agentd.errors.StartupError` (the machine refuses: exit 1) with a message
that names the cause. Nothing here writes to an existing file.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import sqlite3
import ssl
import tempfile
from pathlib import Path
from urllib.parse import quote, urlsplit

from agentd.errors import ConfigError, StartupError
from agentd.server.envoy import bind_error, connection_limit, raise_open_file_limit
from agentd.settings import Settings

__all__ = [
    "check_bind",
    "check_etcd",
    "check_state_store",
    "check_tls",
    "preflight",
    "resolve_host",
]

_NUMERIC = re.compile(r"^[0-9.]+$")


def preflight(settings: Settings) -> Settings:
    """Run every check; return the settings with ``host`` resolved to an IP address."""
    host = resolve_host(settings.host)
    if host != settings.host:
        settings = settings.model_copy(update={"host": host})
    if settings.tls_cert is not None and settings.tls_key is not None:
        check_tls(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    if settings.plugins.exists() and not settings.plugins.is_dir():
        raise ConfigError(f"plugins {settings.plugins} is not a directory")
    if settings.state_store == "sqlite":
        check_state_store(settings.state_path)
    check_bind(settings.host, settings.port, udp=settings.http3)
    if settings.health_port is not None:
        if settings.health_port == settings.port != 0:
            raise ConfigError(f"health_port {settings.health_port} is the serving port")
        check_bind(settings.host, settings.health_port)
    # Before the tool build: an open-file limit too low to serve is one line, at once.
    connection_limit(settings, raise_open_file_limit())
    return settings


def resolve_host(host: str) -> str:
    """An IP address as given; a host name resolved (IPv4 preferred), else ConfigError."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host or _NUMERIC.match(host) or ":" in host:
        raise ConfigError(f"host {host!r} is not a valid IP address")
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"host {host!r} does not resolve to an address: {reason}") from exc
    addresses = [str(info[4][0]) for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)]
    if not addresses:
        raise ConfigError(f"host {host!r} does not resolve to an IP address")
    ipv4 = [a for a in addresses if ":" not in a]
    return (ipv4 or addresses)[0]


def check_bind(host: str, port: int, *, udp: bool = False) -> None:
    """Bind ``host:port`` (TCP, and UDP for HTTP/3) for a moment; StartupError if refused.

    TCP uses SO_REUSEADDR like Envoy, so a port in TIME_WAIT is not reported busy, while a
    port another process listens on (even with SO_REUSEPORT) is.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    kinds = [socket.SOCK_STREAM] + ([socket.SOCK_DGRAM] if udp and port != 0 else [])
    for kind in kinds:
        with socket.socket(family, kind) as sock:
            if kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                proto = "UDP: " if kind == socket.SOCK_DGRAM else ""
                raise StartupError(proto + bind_error(host, port, exc.errno, exc.strerror)) from exc


def check_etcd(url: str) -> None:
    """``url`` names etcd endpoints: ``http(s)://host:port``, several joined by commas;
    ConfigError naming the first that is not one (nothing is contacted here)."""
    endpoints = [part.strip() for part in url.split(",")]
    for endpoint in endpoints:
        shown = endpoint if len(endpoint) <= 60 else endpoint[:57] + "..."
        try:
            parsed = urlsplit(endpoint)
            port = parsed.port
        except ValueError:
            parsed, port = None, None
        if (
            parsed is None
            or parsed.scheme not in ("http", "https")
            or not parsed.hostname
            or port is None
            or parsed.path not in ("", "/")
            or parsed.query
            or parsed.fragment
        ):
            raise ConfigError(f"{shown!r} is not an etcd URL (http://host:2379, comma-separated)")


def check_tls(cert: Path, key: Path, client_ca: Path | None) -> None:
    """The certificate, key and CA files parse as PEM and the key matches the certificate
    (with the standard library's ssl module: TLS needs no extra package)."""
    _load_certs(cert, "tls-cert")
    if client_ca is not None:
        _load_certs(client_ca, "tls-client-ca")
    if b"ENCRYPTED" in _read(key, "tls-key"):
        raise ConfigError(f"tls-key {key} is encrypted; give an unencrypted key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # The certificate parsed above, so a failure here is the key's.
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as exc:
        if "MISMATCH" in (exc.reason or str(exc)).upper():
            raise ConfigError(f"tls-key {key} does not match tls-cert {cert}") from exc
        raise ConfigError(f"tls-key {key} is not a PEM private key") from exc


def _load_certs(path: Path, name: str) -> None:
    _read(path, name)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise ConfigError(f"{name} {path} is not a PEM certificate") from exc


def _read(path: Path, name: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{name} {path} cannot be read: {exc.strerror}") from exc


def check_state_store(path: Path) -> None:
    """The SQLite state file opens (or can be created); nothing existing is written."""
    name = f"state_path {path}"
    if path.exists():
        if path.is_dir():
            raise ConfigError(f"{name} is a directory, not a SQLite database file")
        if not path.is_file():
            raise ConfigError(f"{name} is not a regular file")
        if not os.access(path, os.R_OK | os.W_OK):
            raise ConfigError(f"{name} is not readable and writable")
        try:
            db = sqlite3.connect(f"file:{quote(str(path.absolute()))}?mode=rw", uri=True)
        except sqlite3.Error as exc:
            raise ConfigError(f"{name} cannot be opened: {exc}") from exc
        try:
            db.execute("PRAGMA schema_version").fetchone()  # reads the header, writes nothing
        except sqlite3.DatabaseError as exc:
            if "not a database" in str(exc):
                raise ConfigError(f"{name} is not a SQLite database") from exc
            raise ConfigError(f"{name} cannot be opened: {exc}") from exc
        finally:
            db.close()
        parent = path.absolute().parent
    else:
        parent = path.absolute().parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise ConfigError(f"{name} cannot be created: {parent} is not a directory")
    # SQLite writes its -wal and -shm files next to the database: try a write there (as
    # root, os.access says yes to places such as /proc that refuse it).
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise ConfigError(f"{name}: cannot write in {parent}: {exc.strerror or exc}") from exc
