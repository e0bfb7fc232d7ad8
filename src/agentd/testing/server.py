"""Start ``agentd serve`` as a child process and wait until it listens."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["RunningServer", "start_server"]

_LISTENING = re.compile(r"agentd listening on (https?)://(\S+):(\d+)")


@dataclass
class RunningServer:
    process: subprocess.Popen[str]
    scheme: str
    host: str
    port: int
    output: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None
    state_dir: str | None = None  # removed on stop

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful drain) and wait; SIGKILL if it does not exit in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.reader is not None:
            self.reader.join(5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        if self.state_dir is not None:
            shutil.rmtree(self.state_dir, ignore_errors=True)
        return self.process.returncode

    def log(self) -> str:
        return "".join(self.output)


def start_server(
    args: Sequence[str] = (),
    *,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
    wrapper: Sequence[str] = (),
) -> RunningServer:
    """Run ``python -m agentd serve --port 0 ARGS`` and return once it listens.

    Agent state goes to a fresh temporary folder unless ``env`` sets ``AGENTD_STATE_PATH``.
    ``wrapper`` goes before the command (e.g. ``unshare ... sh -c ...``: it must exec it).
    """
    state_dir = tempfile.mkdtemp(prefix="agentd-state-")
    process = subprocess.Popen(
        [*wrapper, sys.executable, "-m", "agentd", "serve", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={
            **os.environ,
            "COLUMNS": "250",
            "AGENTD_STATE_PATH": os.path.join(state_dir, "agents.db"),
            **(env or {}),
        },
    )
    output: list[str] = []
    found: list[re.Match[str]] = []
    ready = threading.Event()

    def pump() -> None:
        # Keep reading after start-up so the child never blocks on a full pipe.
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            if not found and (match := _LISTENING.search(line)):
                found.append(match)
                ready.set()
        ready.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    end = time.monotonic() + timeout
    while not ready.wait(0.05) and time.monotonic() <= end:
        pass
    if not found:
        timed_out = process.poll() is None
        if timed_out:
            process.kill()
        process.wait()
        reader.join(5)
        process.stdout.close()  # type: ignore[union-attr]
        shutil.rmtree(state_dir, ignore_errors=True)
        what = "did not start in time" if timed_out else f"exited with {process.returncode}"
        raise RuntimeError(f"agentd serve {what}:\n" + "".join(output))
    scheme, host, port = found[0].groups()
    return RunningServer(process, scheme, host, int(port), output, reader, state_dir)
