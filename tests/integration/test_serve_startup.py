"""``agentd serve`` start-up failures: one line naming the cause, a non-zero exit, no damage."""

from __future__ import annotations

import hashlib
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from agentd.server import EnvoyProcess, StartupError
from agentd.server.envoy import explain_envoy_log
from agentd.settings import load_settings
from agentd.testing import start_server
from agentd.testing.certs import make_test_certs


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(
    *args: str, state: Path, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """``agentd serve`` expected to fail at start; stdout and stderr merged.

    A free port comes first so nothing binds 8080; a ``--port`` in ``args`` wins over it.
    """
    return subprocess.run(
        [sys.executable, "-m", "agentd", "serve", "--port", str(free_port()), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "80", "AGENTD_STATE_PATH": str(state), **(env or {})},
    )


def assert_one_line_error(out: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert out.returncode != 0, out.stdout
    assert "Traceback" not in out.stdout, out.stdout
    assert '"static_resources"' not in out.stdout, out.stdout  # no Envoy config dump
    errors = [line for line in out.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.stdout
    for needle in needles:
        assert needle in errors[0], out.stdout
    return errors[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- a port another agentd serves -----------------------------------------------------


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    running = start_server(["--port", str(free_port())])
    yield running
    running.stop()


def test_second_serve_on_a_served_port_is_refused(first, tmp_path):
    out = serve("--port", str(first.port), state=tmp_path / "b.db")
    assert_one_line_error(out, f"port {first.port} is in use")
    assert out.returncode == 1
    assert not (tmp_path / "b.db").exists()
    # The first server is untouched and still the only one answering.
    assert httpx.get(f"{first.url}/healthz", timeout=5).status_code == 200


def test_envoy_itself_refuses_a_served_port(first, tmp_path):
    # Past the pre-flight check (a race between two starts): Envoy must not share the port
    # through SO_REUSEPORT, and its failure is explained in one line.
    settings = load_settings(port=first.port, state_path=tmp_path / "c.db")
    envoy = EnvoyProcess(settings)
    try:
        with pytest.raises(StartupError, match=rf"^port {first.port} is in use"):
            envoy.start(timeout=20)
    finally:
        envoy.kill()
    assert httpx.get(f"{first.url}/healthz", timeout=5).status_code == 200


def test_tcp_listener_does_not_reuse_its_port(tmp_path):
    certs = make_test_certs(tmp_path)
    settings = load_settings(tls_cert=certs.server_cert, tls_key=certs.server_key, http3=True)
    tcp, udp = EnvoyProcess(settings).config(8080)["static_resources"]["listeners"]
    assert tcp["enable_reuse_port"] is False
    # Envoy refuses UDP without SO_REUSEPORT on several workers; the TCP bind guards both.
    assert udp["address"]["socket_address"]["protocol"] == "UDP"
    assert "enable_reuse_port" not in udp
    # --processes N: the node's processes share the port (the health port too); serve
    # checked it without SO_REUSEPORT first.
    shared = load_settings(processes=2, health_port=9090)
    listeners = EnvoyProcess(shared).config(8080)["static_resources"]["listeners"]
    assert [listener["enable_reuse_port"] for listener in listeners] == [True, True]
    # HTTP/3 is not shared: a QUIC connection's packets could reach another process.
    tls = ["--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key)]
    out = serve(*tls, "--http3", "--processes", "2", state=tmp_path / "a.db")
    assert_one_line_error(out, "processes 2: not available with http3")
    assert out.returncode == 2


def test_second_serve_with_http3_on_a_served_port_is_refused(first, tmp_path):
    certs = make_test_certs(tmp_path)
    tls = ["--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key), "--http3"]
    out = serve("--port", str(first.port), *tls, state=tmp_path / "b.db")
    assert_one_line_error(out, f"port {first.port} is in use")
    assert httpx.get(f"{first.url}/healthz", timeout=5).status_code == 200


# -- the state store -------------------------------------------------------------------


def test_state_path_not_sqlite(tmp_path):
    text = tmp_path / "notdb.txt"
    text.write_text("hello, not a database\n")
    before = digest(text)
    out = serve("--port", str(free_port()), state=text)
    assert_one_line_error(out, f"state_path {text} is not a SQLite database")
    assert out.returncode == 2
    assert digest(text) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notdb.txt"]


def test_state_path_directory(tmp_path):
    out = serve("--port", str(free_port()), state=tmp_path)
    assert_one_line_error(out, f"state_path {tmp_path} is a directory")
    assert list(tmp_path.iterdir()) == []


def test_state_path_under_a_file(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x\n")
    out = serve("--port", str(free_port()), state=afile / "agents.db")
    assert_one_line_error(out, f"{afile} is not a directory")
    assert afile.read_text() == "x\n"


def test_existing_state_kept_when_start_fails(tmp_path):
    db = tmp_path / "agents.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE agent_state (address TEXT PRIMARY KEY, state BLOB)")
        conn.execute("INSERT INTO agent_state VALUES ('echo/x', x'00')")
    conn.close()
    before = digest(db)
    out = serve("--port", str(free_port()), "--host", "999.1.1.1", state=db)
    assert out.returncode == 2
    assert digest(db) == before


# -- host, TLS ----------------------------------------------------------------------------


def test_host_not_an_ip_address(tmp_path):
    out = serve("--port", str(free_port()), "--host", "999.1.1.1", state=tmp_path / "a.db")
    assert_one_line_error(out, "host '999.1.1.1' is not a valid IP address")
    assert out.returncode == 2


def test_host_not_on_this_machine(tmp_path):
    port = free_port()
    try:
        with socket.socket() as sock:
            sock.bind(("8.8.8.8", port))
        pytest.skip("this machine has the address 8.8.8.8")
    except OSError:
        pass
    out = serve("--port", str(port), "--host", "8.8.8.8", state=tmp_path / "a.db")
    assert_one_line_error(out, f"cannot bind 8.8.8.8:{port}: address not available")


def test_host_name_that_does_not_resolve(tmp_path):
    out = serve("--host", "no-such-host.invalid", state=tmp_path / "a.db")
    assert_one_line_error(out, "host 'no-such-host.invalid' does not resolve")
    assert out.returncode == 2


def test_host_name_is_resolved(tmp_path):
    running = start_server(["--host", "localhost"])
    try:
        assert running.host == "127.0.0.1"
        assert httpx.get(f"{running.url}/healthz", timeout=5).status_code == 200
    finally:
        running.stop()


def test_tls_files_not_pem(tmp_path):
    certs = make_test_certs(tmp_path)
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    state = tmp_path / "a.db"
    out = serve("--tls-cert", str(bad), "--tls-key", str(certs.server_key), state=state)
    assert_one_line_error(out, f"tls-cert {bad} is not a PEM certificate")
    assert out.returncode == 2
    out = serve("--tls-cert", str(certs.server_cert), "--tls-key", str(bad), state=state)
    assert_one_line_error(out, f"tls-key {bad} is not a PEM private key")
    out = serve(
        "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.client_key), state=state
    )
    assert_one_line_error(out, f"tls-key {certs.client_key} does not match tls-cert")
    out = serve(
        "--tls-cert",
        str(certs.server_cert),
        "--tls-key",
        str(certs.server_key),
        "--tls-client-ca",
        str(bad),
        state=state,
    )
    assert_one_line_error(out, f"tls-client-ca {bad} is not a PEM certificate")


# -- settings ---------------------------------------------------------------------------


def test_config_with_a_non_string_key(tmp_path):
    config = tmp_path / "k.yaml"
    config.write_text("1: 2\n")
    out = serve("--config", str(config), state=tmp_path / "a.db")
    assert_one_line_error(out, "invalid settings", "setting names must be strings")
    assert out.returncode == 2


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"AGENTD_WORKERS": "many"}, "workers (AGENTD_WORKERS): "),
        ({"AGENTD_TOOL_TIMEOUT_S": "-1", "AGENTD_MAX_BODY_BYTES": "x"}, "; "),
    ],
    ids=["one-field", "two-fields"],
)
def test_bad_settings_are_one_line_naming_the_variable(tmp_path, env, needle):
    # The same formatter as every other command: no pydantic dump over several lines.
    out = serve(state=tmp_path / "a.db", env=env)
    line = assert_one_line_error(out, "invalid settings: ", needle)
    assert "For further information" not in out.stdout and "errors.pydantic.dev" not in line
    assert out.returncode == 2


def test_a_malformed_etcd_url_is_refused(tmp_path):
    out = serve("--etcd", "127.0.0.1:2379", state=tmp_path / "a.db")
    assert_one_line_error(out, "--etcd: '127.0.0.1:2379' is not an etcd URL")
    assert out.returncode == 2
    out = serve(state=tmp_path / "a.db", env={"AGENTD_ETCD": "http://127.0.0.1:2379,ftp://x"})
    assert_one_line_error(out, "etcd (config file or AGENTD_ETCD): 'ftp://x' is not an etcd URL")
    assert out.returncode == 2
    assert not (tmp_path / "a.db").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--advertise", "no-port"), "advertise must be HOST:PORT"),
        (("--advertise", "h:99999"), "advertise must be HOST:PORT"),
        (("--node-id", "bad/id"), "node_id"),
        (("--zone", "a zone"), "zone"),
        (("--cluster", "-x"), "cluster"),
    ],
)
def test_bad_cluster_flags_are_one_line(tmp_path, args, needle):
    out = serve("--etcd", "http://127.0.0.1:2379", *args, state=tmp_path / "a.db")
    assert_one_line_error(out, "invalid settings: ", needle)
    assert out.returncode == 2


def test_processes_refuse_what_they_cannot_share(tmp_path):
    out = serve("--processes", "0", state=tmp_path / "a.db")
    assert_one_line_error(out, "processes", "greater than or equal to 1")
    assert out.returncode == 2
    out = serve("--processes", "2", "--etcd", "http://127.0.0.1:2379", state=tmp_path / "a.db")
    assert_one_line_error(out, "processes 2: not available with etcd")
    assert out.returncode == 2
    out = serve(
        state=tmp_path / "a.db", env={"AGENTD_PROCESSES": "2", "AGENTD_STATE_STORE": "memory"}
    )
    assert_one_line_error(out, "processes > 1 needs a shared state store")
    assert out.returncode == 2


# -- explaining Envoy's log -----------------------------------------------------------------


def test_explain_envoy_log():
    bind = (
        "[2026-01-01][1][critical][main] error `cannot bind '127.0.0.1:8080': Address already"
        " in use` initializing config 'goo.gle/debugproto \n {\"admin\": {}}'\n"
    )
    assert explain_envoy_log(bind) == (
        "port 8080 is in use on 127.0.0.1 (is another agentd serving it?)"
    )
    app = (
        "ERROR agentd.agents.registry: agent plugin broken.py failed to load; skipped\n"
        "Traceback (most recent call last):\n"
        '  File "broken.py", line 3, in <module>\n'
        "RuntimeError: this plugin is broken on purpose\n"
        "[x][error][dynamic_modules] Exception in ASGI lifespan\n"
        "Traceback (most recent call last):\n"
        '  File "store.py", line 154, in _open\n'
        '    db.execute("PRAGMA journal_mode=WAL")\n'
        "DatabaseError: file is not a database\n"
        "RuntimeError: Application startup failed. Exiting.\n"
        "[x][critical][main] error `Failed to create filter config: Failed to initialize"
        " dynamic module` initializing config '\n"
    )
    assert explain_envoy_log(app) == (
        "the gateway failed to start: DatabaseError: file is not a database"
    )
    config = "[x][critical] error `malformed IP address: localhost` initializing config '\n{}'"
    assert explain_envoy_log(config) == (
        "Envoy refused its configuration: malformed IP address: localhost"
    )
    assert explain_envoy_log("something else\n") is None


def test_explain_envoy_log_startup_failed():
    # The gateway reports a failed start as lifespan.startup.failed; pyvoy logs its message.
    app = (
        "2026-01-01 ERROR agentd.gateway.app: the node failed to start\n"
        "Traceback (most recent call last):\n"
        '  File "node.py", line 112, in start\n'
        "RuntimeError: the runtime refused to start\n"
        "[x][error][dynamic_modules] Failed to initialize ASGI app\n"
        "RuntimeError: Application startup failed: RuntimeError: the runtime refused to start\n"
        "[x][critical][main] error `Failed to create filter config: Failed to initialize"
        " dynamic module` initializing config '\n"
    )
    assert explain_envoy_log(app) == (
        "the gateway failed to start: RuntimeError: the runtime refused to start"
    )


def test_plugins_path_that_is_a_file(tmp_path):
    (tmp_path / "notes").write_text("x")
    out = serve("--plugins", str(tmp_path / "notes"), state=tmp_path / "agents.db")
    assert_one_line_error(out, "plugins", "is not a directory")
    assert out.returncode == 2


# -- the open-file limit and the connection limit ----------------------------------------


def test_open_file_limit_raised_and_connection_limit_kept_under_it(tmp_path):
    """serve raises its soft RLIMIT_NOFILE to the hard limit (Envoy inherits it) and keeps
    max_connections, with the health reserve and a headroom, under it."""
    import resource
    import threading
    import time

    from agentd.server.envoy import FD_HEADROOM, HEALTH_CONNECTIONS

    soft, hard = 300, 600
    process = subprocess.Popen(
        [sys.executable, "-m", "agentd", "serve", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "250", "AGENTD_STATE_PATH": str(tmp_path / "a.db")},
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)),
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    expected = hard - FD_HEADROOM - HEALTH_CONNECTIONS
    try:
        deadline = time.monotonic() + 60
        while not any("note: max_connections" in line for line in lines):
            assert process.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.05)
        note = next(line for line in lines if "note: max_connections" in line)
        assert f"lowered to {expected:,} under the open-file limit ({hard:,})" in note
        url = next(line for line in lines if "agentd listening on" in line).split()[3]
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
        (envoy,) = [
            int(p.name)
            for p in Path("/proc").iterdir()
            if p.name.isdigit() and _parent(p) == process.pid
        ]
        limits = Path(f"/proc/{envoy}/limits").read_text()
        row = next(line for line in limits.splitlines() if line.startswith("Max open files"))
        assert row.split()[3:5] == [str(hard), str(hard)]
    finally:
        process.terminate()
        process.wait(30)
        reader.join(5)
        process.stdout.close()  # type: ignore[union-attr]
    assert process.returncode == 0


def _parent(proc: Path) -> int:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def test_connection_limit_from_the_open_file_limit():
    from agentd.server.envoy import FD_HEADROOM, HEALTH_CONNECTIONS, connection_limit

    settings = load_settings(max_connections=10_000)
    assert connection_limit(settings, 1_048_576) == 10_000
    assert connection_limit(settings, 1024) == 1024 - FD_HEADROOM - HEALTH_CONNECTIONS
    with pytest.raises(StartupError, match=r"open-file limit \(300\) is too low"):
        connection_limit(settings, 300)


def test_open_file_limit_too_low_to_serve(tmp_path):
    import resource

    process = subprocess.run(
        [sys.executable, "-m", "agentd", "serve", "--port", str(free_port())],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "80", "AGENTD_STATE_PATH": str(tmp_path / "a.db")},
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300)),
    )
    assert_one_line_error(process, "the open-file limit (300) is too low to serve")
    assert process.returncode == 1


def test_health_port_equal_to_the_port_is_refused(tmp_path):
    port = free_port()
    out = serve("--port", str(port), state=tmp_path / "a.db", env={"AGENTD_HEALTH_PORT": str(port)})
    assert_one_line_error(out, f"health_port {port} is the serving port")
    assert out.returncode == 2


def test_each_of_n_processes_runs_its_share_of_envoy_workers():
    # Envoy starts a worker per core by default: N processes would run N times as many.
    import os

    from agentd.server.envoy import _worker_threads

    assert _worker_threads(1) == []  # one process: Envoy's own default
    cores = os.cpu_count() or 1
    assert _worker_threads(2) == ["--concurrency", str(max(1, cores // 2))]
    assert _worker_threads(64) == ["--concurrency", "1"]
