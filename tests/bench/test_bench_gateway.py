"""`agentd bench gateway --quick` runs end to end and writes complete JSON.

Timings are not asserted (they belong to the benchmark, not the tests); completeness and
zero errors are.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from agentd_bench.gateway import QUICK

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
            # --quick sends a set number per point: every one answered, none failed.
            assert point["requests"] == QUICK.requests(concurrency) and point["errors"] == 0, point
    assert {t["name"] for t in document["targets"]} == {
        "grpc_vs_grpc_aio",
        "json_vs_fastapi",
        "startup",
        "tracing_ratio_0.01",
        "tracing_ratio_1",
    }
    assert len(document["startup"]["runs_s"]) == QUICK.startup_runs
    assert 0 < document["startup"]["median_s"] < 30
    # Tracing modes: each measured without errors; off exports nothing, 1.0 exports.
    modes = document["tracing"]["modes"]
    assert set(modes) == {"off", "ratio_0.01", "ratio_1"}
    for mode in modes.values():
        assert mode["rps"] > 0 and mode["errors"] == 0 and mode["rps_vs_off"] > 0, mode
        assert mode["cpu_us_per_request"] > 0 and mode["cpu_efficiency_vs_off"] > 0, mode
    assert modes["off"]["runs"][0]["export_bytes"] == 0
    assert modes["ratio_1"]["runs"][0]["export_requests"] > 0


def test_bench_gateway_only_tracing(tmp_path):
    """`--only tracing`: that section alone, in files of its own (gateway-latest.json, the
    whole suite's, is left alone)."""
    out = subprocess.run(
        [
            *(sys.executable, "-m", "agentd", "bench", "gateway", "--only", "tracing"),
            *("--quick", "--json", "--out-dir", str(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    document = json.loads(out.stdout)
    assert document["suite"] == "gateway-tracing"
    assert (tmp_path / "gateway-tracing-latest.json").is_file()
    assert not (tmp_path / "gateway-latest.json").exists()
    assert "points" not in document
    assert {t["name"] for t in document["targets"]} == {"tracing_ratio_0.01", "tracing_ratio_1"}
    modes = document["tracing"]["modes"]
    assert set(modes) == {"off", "ratio_0.01", "ratio_1"}
    for mode in modes.values():
        assert mode["rps"] > 0 and mode["errors"] == 0, mode
    assert modes["ratio_1"]["runs"][0]["export_requests"] > 0


@pytest.mark.parametrize("args", [["gateway", "--only", "startup"], ["swarm", "--only", "tracing"]])
def test_bench_only_is_checked(tmp_path, args):
    out = subprocess.run(
        [sys.executable, "-m", "agentd", "bench", *args, "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "--only is for the gateway suite" in out.stderr and "Traceback" not in out.stderr
    assert not list(tmp_path.iterdir())
