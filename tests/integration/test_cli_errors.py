"""Mistakes a person makes at the command line: each ends with one clear line on stderr and
a non-zero exit (2 for a bad argument or setting, 1 for a failure at run time), never with
a Python traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentd.cli.bench import SUITES


def agentd(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentd", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


def refused(out: subprocess.CompletedProcess[str], code: int, message: str) -> None:
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    assert message in out.stderr, out.stderr


# --- 1. agentd swarm ---------------------------------------------------------------------


def test_swarm_refuses_a_state_path_that_is_no_sqlite_file(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    out = agentd("swarm", "--agents", "10", "--state-path", str(notes), cwd=tmp_path)
    refused(out, 2, "is not a SQLite database")
    assert notes.read_text() == "my notes\n"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no -wal, -shm


@pytest.mark.parametrize(
    ("make", "path", "message"),
    [
        (lambda d: (d / "adir").mkdir(), "adir", "is a directory"),
        (lambda d: (d / "afile").write_text("x"), "afile/x.db", "afile is not a directory"),
        (lambda d: (d / "afile").write_text("x"), "afile/sub/x.db", "afile is not a directory"),
        (lambda d: None, "/proc/agentd-test/x.db", "cannot write in /proc"),
    ],
    ids=["directory", "under-a-file", "deep-under-a-file", "unwritable"],
)
def test_swarm_refuses_unusable_state_paths(tmp_path, make, path, message):
    make(tmp_path)
    out = agentd("swarm", "--agents", "10", "--state-path", path, cwd=tmp_path)
    refused(out, 2, message)


def test_swarm_refuses_a_damaged_database_up_front(tmp_path):
    db = tmp_path / "state.db"
    db.write_bytes(b"SQLite format 3\x00" + b"garbage" * 600)
    before = db.read_bytes()
    out = agentd("swarm", "--agents", "10", "--state-path", str(db), cwd=tmp_path)
    refused(out, 2, "is not a SQLite database")
    assert db.read_bytes() == before


@pytest.mark.parametrize("workers", ["0", "-1", "1000001"])
def test_swarm_refuses_bad_worker_counts(tmp_path, workers):
    out = agentd("swarm", "--agents", "10", "--workers", workers, cwd=tmp_path)
    refused(out, 2, "--workers must be between 1 and")


def test_swarm_refuses_state_path_with_no_persist(tmp_path):
    db = tmp_path / "state.db"
    out = agentd("swarm", "-n", "10", "--state-path", str(db), "--no-persist", cwd=tmp_path)
    refused(out, 2, "--state-path is unused with --no-persist")
    assert not db.exists()


# --- 2. settings from the environment or a config file ----------------------------------


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"AGENTD_PORT": "abc"}, "invalid settings: port (AGENTD_PORT)"),
        ({"AGENTD_CONFIG": "/nonexistent"}, "cannot read config file /nonexistent"),
        ({"AGENTD_HTTP3": "1"}, "http3 needs TLS"),
    ],
    ids=["bad-port", "missing-config", "http3-without-tls"],
)
@pytest.mark.parametrize(
    "command", [["tools", "build"], ["bench", "tools", "--quick"]], ids=["tools-build", "bench"]
)
def test_commands_report_bad_settings(tmp_path, env, message, command):
    out = agentd(*command, cwd=tmp_path, env=env)
    refused(out, 2, message)
    assert len(out.stderr.strip().splitlines()) == 1


# --- 3. agentd tools build --cache-dir -----------------------------------------------------


@pytest.mark.parametrize("cache_dir", ["afile", "afile/sub"])
def test_tools_build_refuses_a_cache_dir_that_cannot_be_one(tmp_path, cache_dir):
    (tmp_path / "afile").write_text("x")
    out = agentd("tools", "build", "--cache-dir", cache_dir, cwd=tmp_path)
    refused(out, 2, "tools cache directory")
    assert (tmp_path / "afile").read_text() == "x"


# --- 4. agentd bench --out-dir -----------------------------------------------------------


@pytest.mark.parametrize("suite", list(SUITES))
@pytest.mark.parametrize(
    ("out_dir", "message"),
    [("afile", "exists and is not a directory"), ("afile/sub", "cannot create results folder")],
)
def test_bench_checks_the_out_dir_before_running(tmp_path, suite, out_dir, message):
    (tmp_path / "afile").write_text("x")
    started = time.monotonic()
    out = agentd("bench", suite, "--quick", "--out-dir", out_dir, cwd=tmp_path, timeout=20)
    refused(out, 2, message)
    assert time.monotonic() - started < 10  # refused up front, not after a benchmark


# --- 5. a URL where something other than agentd answers ---------------------------------


@pytest.fixture(scope="module")
def other_server(tmp_path_factory) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path_factory.mktemp("www")
    process = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.parametrize(
    "command",
    [
        ["tools", "call", "calc", "{}"],
        ["tools", "list"],
        ["models"],
        ["models", "load", "m"],
        ["call", "echo", "hi"],
        ["call", "echo", "hi", "--stream"],
    ],
    ids=" ".join,
)
def test_client_commands_name_a_url_that_is_not_agentd(tmp_path, other_server, command):
    out = agentd(*command, "--url", other_server, cwd=tmp_path)
    refused(out, 1, f"{other_server} did not answer like an agentd server (HTTP ")
    assert "content-type text/html" in out.stderr


# --- 6. agentd call --timeout ------------------------------------------------------------


@pytest.mark.parametrize("timeout", ["nan", "inf", "-inf", "1e12", "86401", "-1", "0"])
def test_call_refuses_timeouts_that_are_not_a_sane_number_of_seconds(tmp_path, timeout):
    out = agentd(
        "call", "echo", "hi", "--timeout", timeout, "--url", "http://127.0.0.1:9", cwd=tmp_path
    )
    refused(out, 2, "--timeout must be a number of seconds above 0 and at most 86400")


# --- 7. help text -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        (["call"], "[env: AGENTD_TOKEN]"),
        (["models"], "[env: AGENTD_TOKEN]"),
        (["tools", "list"], "[env: AGENTD_TOKEN]"),
        (["tools", "call"], "[env: AGENTD_TOKEN]"),
        (["tools", "build"], "[env: AGENTD_TOOLS_CACHE_DIR]"),
        (["bench"], f"Suite to run: {', '.join(SUITES)}."),
    ],
    ids=["call", "models", "tools-list", "tools-call", "tools-build", "bench"],
)
def test_help_shows_bracketed_text_and_every_suite(tmp_path, command, shown):
    out = agentd(*command, "--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert shown in out.stdout, out.stdout
