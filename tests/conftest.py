from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from agentd.testing import RunningServer, start_server

PLUGINS = Path(__file__).parent / "plugins"


@pytest.fixture(scope="session")
def server() -> Iterator[RunningServer]:
    """One shared server with the test agents and a 1 MiB body limit."""
    running = start_server(
        ["--plugins", str(PLUGINS)], env={"AGENTD_MAX_BODY_BYTES": str(1024 * 1024)}
    )
    yield running
    running.stop()


@pytest.fixture(scope="session")
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as ch:
        yield ch


@pytest.fixture
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text, 0 if absent."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # llama-cpp-python opens two /dev/null files at import and never closes them, which
    # prints "Exception ignored ... ResourceWarning" at interpreter exit after a green run.
    utils = sys.modules.get("llama_cpp._utils")
    for name in ("outnull_file", "errnull_file"):
        handle = getattr(utils, name, None)
        if handle is not None:
            handle.close()
