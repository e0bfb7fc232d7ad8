"""Start benchmark servers as child processes and stop them again, always by PID.

A server's own output goes to a log file so it never mixes with the result table. Stopping
sends SIGTERM to the PID we started, waits, and only then escalates to SIGKILL; descendants
seen before the stop (agentd serve runs Envoy in its own session) are killed by PID if they
outlive their parent, so a failed run leaves nothing listening.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from agentd.errors import Unavailable
from agentd_bench.errors import BenchError

__all__ = ["ServerError", "ServerProcess", "agentd_env", "descendants", "free_port", "log_tails"]


class ServerError(BenchError, Unavailable):
    """A server under test did not start, exited or did not listen."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel considers free right now (bind to port 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def agentd_env() -> dict[str, str]:
    """This environment without ``AGENTD_*`` variables, for a server that should run on defaults.

    A user's settings (auth tokens, a config file) would change what is measured or make every
    request fail.
    """
    return {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")}


def log_tails(workdir: Path, lines: int = 15) -> str:
    """The last lines of every ``*.log`` in ``workdir``: server logs vanish with a temporary
    directory, so errors carry their tails."""
    parts = []
    for log in sorted(workdir.glob("*.log")):
        text = log.read_text(errors="replace").splitlines()[-lines:]
        if text:
            parts.append(f"--- {log.name}\n" + "\n".join(text))
    return "\n".join(parts)


def _start_time(pid: int) -> str | None:
    # Field 22 of /proc/PID/stat; with the PID it identifies a process even if PIDs are reused.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def descendants(pid: int) -> list[int]:
    """The PIDs below ``pid`` (children, their children, ...), from /proc."""
    found: list[int] = []
    stack = [pid]
    while stack:
        parent = stack.pop()
        try:
            tasks = list(Path(f"/proc/{parent}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                found.append(child)
                stack.append(child)
    return found


class ServerProcess:
    """One server child process listening on 127.0.0.1:``port``."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        port: int,
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.port = port
        self.log_path = log_path
        self._env = dict(env) if env is not None else None
        self._cwd = cwd
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env,
                cwd=self._cwd,
            )

    def check_alive(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            code = None if self._proc is None else self._proc.returncode
            raise ServerError(f"{self.name} exited (status {code}); see {self.log_path}")

    def wait_listening(self, timeout: float = 30.0) -> None:
        """Block until the port accepts TCP connections, or raise ServerError."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.check_alive()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.02)
        raise ServerError(f"{self.name} did not listen on port {self.port} within {timeout:.0f}s")

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM the server, wait up to ``timeout`` s, then SIGKILL; return its exit status."""
        proc = self._proc
        if proc is None:
            return None
        family = [(pid, _start_time(pid)) for pid in descendants(proc.pid)]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid, started in family:
            # Only a process that is still the same one we saw earlier.
            if started is not None and _start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        return proc.returncode

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
