from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cluster.servers import Server, etcd_server, redis_server


@pytest.fixture
def etcd(tmp_path) -> Iterator[Server]:
    with etcd_server(tmp_path) as server:
        yield server


@pytest.fixture
def redis(tmp_path) -> Iterator[Server]:
    with redis_server(tmp_path) as server:
        yield server
