"""Sampling decided once per request, tested in process through ASGI:
tests/unit/gateway/sampling_in_process.py, run in a fresh interpreter (the gateway loads
agentd's KServe protos, which cannot share a process with tritonclient's)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_sampling_in_process():
    inproc = Path(__file__).with_name("sampling_in_process.py")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(inproc)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert " passed" in done.stdout and "failed" not in done.stdout, done.stdout
