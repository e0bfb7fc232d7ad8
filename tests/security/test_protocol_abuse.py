"""Connection abuse against a live server with small limits: too many connections, slow
headers, idle keep-alive connections, header floods. The server sheds them within its
limits and timeouts, never crashes, and health checks keep being answered.

Every count and wait is bounded; every socket is closed.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import select
import socket
import time
from collections.abc import Iterator

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentd.testing import RunningServer, start_server
from tests.conftest import PLUGINS
from tests.security.test_envoy_admin import envoy_pid, unix_socket_paths

MAX_CONNECTIONS = 200
HEADERS_TIMEOUT_S = 2.0
IDLE_TIMEOUT_S = 4.0
MAX_HEADERS = 60
MAX_HEADERS_KIB = 16
MAX_STREAMS = 50
GENEROUS_S = 20.0  # a bound on top of each timeout: the machine is shared and busy

_HEALTH = re.compile(r"health checks: https?://\S+?:(\d+)/healthz")


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    running = start_server(
        ["--plugins", str(PLUGINS)],
        env={
            "AGENTD_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
            "AGENTD_HEALTH_PORT": "0",
            "AGENTD_REQUEST_HEADERS_TIMEOUT_S": str(HEADERS_TIMEOUT_S),
            "AGENTD_CONNECTION_IDLE_TIMEOUT_S": str(IDLE_TIMEOUT_S),
            "AGENTD_MAX_REQUEST_HEADERS": str(MAX_HEADERS),
            "AGENTD_MAX_REQUEST_HEADERS_KIB": str(MAX_HEADERS_KIB),
            "AGENTD_MAX_STREAMS_PER_CONNECTION": str(MAX_STREAMS),
        },
    )
    yield running
    assert running.stop() == 0, running.log()[-3000:]


def health_port(server: RunningServer) -> int:
    """The health port serve names (on a line after the banner's first)."""
    deadline = time.monotonic() + GENEROUS_S
    while (match := _HEALTH.search(server.log())) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert match is not None, "serve names its health-check port"
    return int(match[1])


def envoy_stats(server: RunningServer, pattern: str) -> dict[str, int]:
    """Envoy's counters matching ``pattern``, read through its admin socket (as the same
    user; the test finds the socket the way an operator would, from the process)."""
    path = next(p for p in unix_socket_paths(envoy_pid(server)) if "agentd-admin" in p)
    connection = http.client.HTTPConnection("envoy", timeout=GENEROUS_S)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(GENEROUS_S)
    try:
        sock.connect(path)
        connection.sock = sock
        connection.request("GET", f"/stats?format=json&filter={pattern}")
        data = json.loads(connection.getresponse().read())
    finally:
        connection.close()
        sock.close()
    return {stat["name"]: int(stat["value"]) for stat in data["stats"] if "value" in stat}


def assert_healthy(port: int, host: str = "127.0.0.1") -> float:
    """GET /healthz from a fresh client answers 200 within a generous bound; its time."""
    started = time.monotonic()
    with httpx.Client(timeout=GENEROUS_S) as client:
        assert client.get(f"http://{host}:{port}/healthz").status_code == 200
    return time.monotonic() - started


@contextlib.contextmanager
def connections(port: int, count: int, host: str = "127.0.0.1") -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    try:
        for _ in range(count):
            opened.append(socket.create_connection((host, port), timeout=GENEROUS_S))
        yield opened
    finally:
        for sock in opened:
            sock.close()


def wait_closed(socks: list[socket.socket], within: float) -> int:
    """Wait until the server closed every socket (EOF or reset, after any reply), at most
    ``within`` seconds in all; how many are still open."""
    end = time.monotonic() + within
    waiting = list(socks)
    while waiting and (left := end - time.monotonic()) > 0:
        readable, _, _ = select.select(waiting, [], [], left)
        for sock in readable:
            try:
                closed = sock.recv(65536) == b""
            except (ConnectionResetError, BrokenPipeError):
                closed = True
            if closed:
                waiting.remove(sock)
    return len(waiting)


def still_open(sock: socket.socket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return True
    try:
        return sock.recv(65536, socket.MSG_PEEK) != b""
    except OSError:
        return False


def test_connections_past_the_limit_are_shed_and_health_answers(server):
    health = health_port(server)
    extra = 40
    with connections(server.port, MAX_CONNECTIONS + extra) as held:
        # The connections past the limit are closed as Envoy accepts them: no more than the
        # limit stay open, and Envoy counts the ones it refused for the limit (the idle
        # timeout closes the others later).
        deadline = time.monotonic() + GENEROUS_S
        while len(open_now := [s for s in held if still_open(s)]) > MAX_CONNECTIONS:
            assert time.monotonic() < deadline, f"{len(open_now)} connections open"
            time.sleep(0.1)
        overflow = envoy_stats(server, r"^listener\.[0-9.]+_[0-9]+\.downstream_cx_overflow$")
        assert sum(overflow.values()) >= extra, overflow
        # The health port has its own reserve: probes are answered while the port is full.
        for _ in range(3):
            assert assert_healthy(health) < GENEROUS_S
        with httpx.Client(base_url=f"http://127.0.0.1:{health}", timeout=GENEROUS_S) as probe:
            assert probe.get("/readyz").status_code == 200
            assert probe.get("/v2/health/ready").status_code == 200
            # Only health routes are served there.
            assert probe.get("/v1/models").status_code == 403
        with grpc.insecure_channel(f"127.0.0.1:{health}") as channel:  # h2c, gRPC health
            check = health_pb2_grpc.HealthStub(channel).Check
            reply = check(health_pb2.HealthCheckRequest(), timeout=GENEROUS_S)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    # Once clients let go, the serving port answers again.
    deadline = time.monotonic() + GENEROUS_S
    while True:
        try:
            assert_healthy(server.port)
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline, "the serving port did not recover"
            time.sleep(0.2)


def test_slow_headers_are_cut_after_the_header_timeout(server):
    with connections(server.port, 20) as held:
        started = time.monotonic()
        for sock in held:
            # a request line and one header, then nothing more
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        assert assert_healthy(server.port) < GENEROUS_S
        left = wait_closed(held, HEADERS_TIMEOUT_S + GENEROUS_S)
        elapsed = time.monotonic() - started
    assert left == 0, f"{left} slow connections still open after {elapsed:.1f}s"
    assert elapsed >= HEADERS_TIMEOUT_S * 0.5  # cut by the timeout, not at once


def test_idle_keep_alive_connections_are_closed_after_the_idle_timeout(server):
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    with connections(server.port, 10) as held:
        for sock in held:
            sock.sendall(request)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert assert_healthy(server.port) < GENEROUS_S
        left = wait_closed(held, IDLE_TIMEOUT_S + GENEROUS_S)
        elapsed = time.monotonic() - started
    assert left == 0, f"{left} idle connections still open after {elapsed:.1f}s"
    assert elapsed >= IDLE_TIMEOUT_S * 0.5


def _raw_request(port: int, headers: list[tuple[str, str]]) -> bytes:
    """Send one HTTP/1.1 request with ``headers``; what the server answered before closing
    or within the bound (b"" when it just closed the connection)."""
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers)
    with socket.create_connection(("127.0.0.1", port), timeout=GENEROUS_S) as sock:
        try:
            sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: x\r\n{lines}\r\n".encode())
            return sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return b""


@pytest.mark.parametrize(
    "headers",
    [
        [(f"x-h{i}", "v") for i in range(MAX_HEADERS + 20)],  # over the count
        [("x-big", "a" * (MAX_HEADERS_KIB * 1024 + 4096))],  # over the size
        [(f"x-h{i}", "v" * 200) for i in range(2000)],  # a flood of both
        [("x-huge", "b" * (1024 * 1024))],  # one 1 MiB header
    ],
    ids=["count", "size", "flood", "huge"],
)
def test_header_floods_get_431_or_a_closed_connection(server, headers):
    answer = _raw_request(server.port, headers)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert server.process.poll() is None
    assert assert_healthy(server.port) < GENEROUS_S


def test_header_flood_over_http2(server):
    headers = {f"x-h{i}": "v" for i in range(MAX_HEADERS + 20)}
    with httpx.Client(http1=False, http2=True, timeout=GENEROUS_S) as client:
        try:
            status = client.get(f"{server.url}/healthz", headers=headers).status_code
        except httpx.TransportError:
            status = None  # the stream or connection was reset
    assert status in (None, 431)
    assert server.process.poll() is None
    assert assert_healthy(server.port) < GENEROUS_S


def test_requests_within_the_limits_are_served(server):
    headers = {f"x-h{i}": "v" * 100 for i in range(MAX_HEADERS - 10)}
    with httpx.Client(base_url=server.url, timeout=GENEROUS_S) as client:
        assert client.get("/healthz", headers=headers).status_code == 200
        reply = client.post(
            "/agentd.v1.AgentService/Invoke",
            json={"agent": "echo/abuse", "message": {"text": "hi"}},
        )
        assert reply.status_code == 200


def test_http2_advertises_the_stream_limit(server):
    import h2.config
    import h2.connection
    import h2.events
    import h2.settings

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    with socket.create_connection(("127.0.0.1", server.port), timeout=GENEROUS_S) as sock:
        sock.sendall(conn.data_to_send())
        advertised = None
        deadline = time.monotonic() + GENEROUS_S
        while advertised is None and time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RemoteSettingsChanged):
                    changed = event.changed_settings.get(
                        h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS
                    )
                    advertised = changed.new_value if changed else None
    assert advertised == MAX_STREAMS


def test_limits_reach_every_listener_in_the_configuration(tmp_path):
    from agentd.server.envoy import HEALTH_CONNECTIONS, EnvoyProcess
    from agentd.settings import load_settings
    from agentd.testing.certs import make_test_certs

    certs = make_test_certs(tmp_path)
    settings = load_settings(
        tls_cert=certs.server_cert,
        tls_key=certs.server_key,
        http3=True,
        health_port=9999,
        max_connections=300,
        request_headers_timeout_s=1.5,
        connection_idle_timeout_s=30,
        stream_idle_timeout_s=120,
        max_streams_per_connection=77,
        max_request_headers_kib=24,
        max_request_headers=40,
    )
    config = EnvoyProcess(settings).config(8443, "/tmp/x/admin.sock")
    listeners = {entry["name"]: entry for entry in config["static_resources"]["listeners"]}
    assert set(listeners) == {"listener", "listener_udp", "health"}
    for name, listener in listeners.items():
        hcm = listener["filter_chains"][0]["filters"][-1]["typed_config"]
        assert hcm["request_headers_timeout"] == "1.500s", name
        assert hcm["stream_idle_timeout"] == "120.000s", name
        assert hcm["max_request_headers_kb"] == 24, name
        assert hcm["common_http_protocol_options"] == {
            "idle_timeout": "30.000s",
            "max_headers_count": 40,
        }, name
        if name == "listener_udp":
            quic = hcm["http3_protocol_options"]["quic_protocol_options"]
            assert quic["max_concurrent_streams"] == 77
        else:
            assert hcm["http2_protocol_options"]["max_concurrent_streams"] == 77
    health = listeners["health"]
    assert health["address"]["socket_address"]["port_value"] == 9999
    assert "transport_socket" not in health["filter_chains"][0]
    health_hcm = health["filter_chains"][0]["filters"][-1]["typed_config"]
    assert health_hcm["http_filters"][0]["name"] == "envoy.filters.http.rbac"
    runtime = config["layered_runtime"]["layers"][0]["static_layer"]
    assert runtime == {
        "envoy.resource_limits.listener.listener.connection_limit": 300,
        "envoy.resource_limits.listener.health.connection_limit": HEALTH_CONNECTIONS,
    }
    (monitor,) = config["overload_manager"]["resource_monitors"]
    limit = monitor["typed_config"]["max_active_downstream_connections"]
    assert limit == 300 + HEALTH_CONNECTIONS
    assert config["admin"]["address"] == {"pipe": {"path": "/tmp/x/admin.sock", "mode": 0o600}}
