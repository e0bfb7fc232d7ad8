"""`agentd bench gateway --quick` runs end to end and writes complete JSON.

Timings are not asserted (they belong to the benchmark, not the tests); completeness and
zero errors are.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.bench  # a suite end to end: `pytest -m bench`


def test_bench_gateway_quick(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "agentd",
            "bench",
            "gateway",
            "--quick",
            "--json",
            "--out-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    document = json.loads(out.stdout)
    assert (tmp_path / "gateway-latest.json").is_file()
    points = {(p["server"], p["protocol"], p["concurrency"]): p for p in document["points"]}
    for server, protocol in [
        ("agentd", "grpc"),
        ("grpc.aio", "grpc"),
        ("agentd", "json"),
        ("fastapi+uvicorn", "json"),
    ]:
        for concurrency in (1, 16, 64):
            point = points[(server, protocol, concurrency)]
            assert point["requests"] > 0 and point["errors"] == 0, point
    assert {t["name"] for t in document["targets"]} == {
        "grpc_vs_grpc_aio",
        "json_vs_fastapi",
        "startup",
    }
    assert 0 < document["startup"]["median_s"] < 30
