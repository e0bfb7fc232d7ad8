"""Envoy's admin interface is not a network port, and no log line carries a credential.

The admin API can stop the server (``/quitquitquit``), dump its configuration and raise the
log level; it must be reachable only by the server's own user (a Unix socket in a private
folder). Request headers that carry credentials must never be written to the server's log,
even at the most verbose levels agentd offers.
"""

from __future__ import annotations

import os
import ssl
import stat
from pathlib import Path

import grpc
import httpx
import pytest

from agentd.testing import RunningServer, start_server
from agentd.v1 import agent_pb2 as pb
from agentd.v1 import agent_pb2_grpc as pb_grpc
from tests.conftest import PLUGINS

TOKEN = "tok-3f9c1e7d-never-logged"
WRONG = "wrong-8a2b-never-logged"
COOKIE = "sess-5d4c-never-logged"
PROXY = "proxy-71e0-never-logged"
SECRETS = (TOKEN, WRONG, COOKIE, PROXY)


def child_pids(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Envoy is ``agentd serve``'s child)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_line = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces or ')': the fields after the last ')' are fixed.
        if int(stat_line.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in (Path("/proc") / str(pid) / "fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def tcp_listen_ports(pid: int) -> set[int]:
    """TCP ports the process listens on, from /proc/<pid>/net/tcp{,6} and its descriptors."""
    inodes = socket_inodes(pid)
    ports = set()
    for name in ("tcp", "tcp6"):
        path = Path("/proc") / str(pid) / "net" / name
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            # st 0A is LISTEN; field 9 is the socket's inode
            if fields[3] == "0A" and int(fields[9]) in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def unix_socket_paths(pid: int) -> set[str]:
    """Paths of the named Unix sockets the process holds open."""
    inodes = socket_inodes(pid)
    paths = set()
    for line in (Path("/proc") / str(pid) / "net" / "unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and int(fields[6]) in inodes and not fields[7].startswith("@"):
            paths.add(fields[7])
    return paths


def envoy_pid(server: RunningServer) -> int:
    children = child_pids(server.process.pid)
    assert len(children) == 1, children
    return children[0]


def test_admin_is_a_private_unix_socket_not_a_tcp_port():
    server = start_server(["--plugins", str(PLUGINS)])
    try:
        envoy = envoy_pid(server)
        # Envoy listens on the serving port and nothing else; agentd itself listens nowhere.
        assert tcp_listen_ports(envoy) == {server.port}
        assert tcp_listen_ports(server.process.pid) == set()
        admin = [Path(p) for p in unix_socket_paths(envoy) if "agentd-admin" in p]
        assert len(admin) == 1, unix_socket_paths(envoy)
        sock, folder = admin[0], admin[0].parent
        info = folder.stat()
        assert stat.S_IMODE(info.st_mode) == 0o700
        assert info.st_uid == os.getuid()
        assert stat.S_ISSOCK(sock.stat().st_mode)
        assert stat.S_IMODE(sock.stat().st_mode) & 0o077 == 0
        assert sorted(p.name for p in folder.iterdir()) == [sock.name]
        # The server still works, and drains and stops through the socket.
        assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
    finally:
        assert server.stop() == 0
    assert "draining" in server.log()
    assert not folder.exists(), "the admin folder is removed when the server stops"


def test_credentials_never_reach_the_log_at_the_most_verbose_levels():
    server = start_server(
        ["--plugins", str(PLUGINS)],
        env={
            "AGENTD_AUTH_TOKENS": TOKEN,
            "AGENTD_LOG_LEVEL": "debug",
            "AGENTD_ENVOY_LOG_LEVEL": "trace",
        },
    )
    try:
        headers = {
            "authorization": f"Bearer {TOKEN}",
            "cookie": f"session={COOKIE}",
            "proxy-authorization": f"Basic {PROXY}",
        }
        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert http.get("/v1/models", headers=headers).status_code == 200
            reply = http.post(
                "/agentd.v1.AgentService/Invoke",
                json={"agent": "echo/log", "message": {"text": "hi"}},
                headers=headers,
            )
            assert reply.status_code == 200
            wrong = http.get("/v1/models", headers={"authorization": f"Bearer {WRONG}"})
            assert wrong.status_code == 401
            # An authorization header that is not a bearer token at all
            odd = http.get("/v1/models", headers={"authorization": WRONG})
            assert odd.status_code == 401
        with grpc.insecure_channel(server.target) as channel:  # HTTP/2, HPACK-encoded
            stub = pb_grpc.AgentServiceStub(channel)
            metadata = (("authorization", f"Bearer {TOKEN}"), ("cookie", COOKIE))
            request = pb.InvokeRequest(agent="echo/log", message=pb.Message(text="hi"))
            assert stub.Invoke(request, metadata=metadata, timeout=30).message.text
            with pytest.raises(grpc.RpcError) as refused:
                stub.Invoke(request, metadata=(("authorization", f"Bearer {WRONG}"),), timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        assert server.stop() == 0
    log = server.log()
    # The log really was verbose: Envoy traced the requests it parsed.
    assert "[trace][http]" in log and "request headers complete" in log
    for secret in SECRETS:
        assert secret not in log, f"{secret} was written to the log"
    assert "[redacted]" in log


def test_credentials_never_reach_the_log_over_tls_h2_and_http3(tmp_path):
    import asyncio

    from agentd.testing.certs import make_test_certs
    from tests.integration.h3client import h3_request

    certs = make_test_certs(tmp_path)
    server = start_server(
        [
            "--plugins",
            str(PLUGINS),
            "--tls-cert",
            str(certs.server_cert),
            "--tls-key",
            str(certs.server_key),
            "--http3",
        ],
        env={
            "AGENTD_AUTH_TOKENS": TOKEN,
            "AGENTD_LOG_LEVEL": "debug",
            "AGENTD_ENVOY_LOG_LEVEL": "trace",
        },
    )
    try:
        headers = {"authorization": f"Bearer {TOKEN}", "cookie": f"session={COOKIE}"}
        context = ssl.create_default_context(cafile=str(certs.ca_cert))
        with httpx.Client(base_url=server.url, verify=context, http2=True) as http:
            reply = http.get("/v1/models", headers=headers, timeout=30)
            assert (reply.status_code, reply.http_version) == (200, "HTTP/2")
        status, _, _ = asyncio.run(
            h3_request(
                server.host,
                server.port,
                certs.ca_cert,
                "GET",
                "/v1/models",
                [(b"authorization", f"Bearer {TOKEN}".encode()), (b"cookie", COOKIE.encode())],
            )
        )
        assert status == 200
    finally:
        assert server.stop() == 0
    log = server.log()
    assert "[trace][quic" in log
    for secret in SECRETS:
        assert secret not in log, f"{secret} was written to the log"


def test_redaction_of_each_form_a_credential_is_logged_in():
    from agentd.server.envoy import redact_credentials

    cases = {
        # Envoy's debug dump of request headers, and its HTTP/1 codec at trace
        b"'authorization', 'Bearer abcdefgh123'\n": b"'authorization', '[redacted]\n",
        b"key=Proxy-Authorization value=Basic dXNlcjpwYXNz\n": (
            b"key=Proxy-Authorization value=[redacted]\n"
        ),
        b"key=cookie value=a=1; b=2\n": b"key=cookie value=[redacted]\n",
        # a library at debug: "name: value", a dict, an ASGI header tuple
        b"Authorization: Bearer x\n": b"Authorization: [redacted]\n",
        b"{'set-cookie': 'id=1'}\n": b"{'set-cookie': '[redacted]\n",
        b"[(b'authorization', b'Bearer abcdefgh123'), (b'host', b'h')]\n": (
            b"[(b'authorization', b'[redacted]\n"
        ),
        # a bearer token with no header name near it
        b"retrying with Bearer abcdefgh123 now\n": b"retrying with Bearer [redacted] now\n",
        # ordinary lines are left alone
        b"missing or invalid bearer token\n": b"missing or invalid bearer token\n",
        b"[info][main] starting workers\n": b"[info][main] starting workers\n",
    }
    for line, expected in cases.items():
        assert redact_credentials(line) == expected, line


def test_admin_folder_removed_when_envoy_dies():
    import signal

    server = start_server([])
    try:
        envoy = envoy_pid(server)
        (sock,) = [Path(p) for p in unix_socket_paths(envoy) if "agentd-admin" in p]
        os.kill(envoy, signal.SIGKILL)
        assert server.process.wait(30) == 1
    finally:
        server.stop()
    assert "exited unexpectedly" in server.log()
    assert not sock.parent.exists()
