"""The command line as a person uses it."""

from __future__ import annotations

import subprocess
import sys


def agentd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentd", *args], capture_output=True, text=True, timeout=timeout
    )


def test_call_unary(server):
    out = agentd("call", "echo", "hello there", "--url", server.url)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "hello there\n"


def test_call_stream(server):
    out = agentd("call", "echo", "one two three", "--stream", "--url", server.url)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "one two three"


def test_call_errors_exit_nonzero_with_code(server):
    out = agentd("call", "ghost", "x", "--url", server.url)
    assert out.returncode == 1
    assert "not_found" in out.stderr
    out = agentd("call", "slow", "5", "--timeout", "0.2", "--url", server.url)
    assert out.returncode == 1
    assert "deadline_exceeded" in out.stderr


def test_call_unreachable_server():
    out = agentd("call", "echo", "x", "--url", "http://127.0.0.1:9", "--timeout", "2")
    assert out.returncode == 1
    assert "cannot reach" in out.stderr


def test_serve_rejects_bad_settings(tmp_path):
    out = agentd("serve", "--http3")
    assert out.returncode == 2
    assert "http3 needs TLS" in out.stdout
    out = agentd("serve", "--tls-cert", str(tmp_path / "no.pem"), "--tls-key", str(tmp_path / "k"))
    assert out.returncode == 2
    assert "not a readable file" in out.stdout


def test_banner_shows_example_calls(server):
    log = server.log()
    assert "curl" in log and "grpcurl" in log and "agentd call" in log
    assert "/v1/chat/completions" in log


def test_version():
    out = agentd("version")
    assert out.returncode == 0 and out.stdout.strip()
