"""`agentd bench inference --quick` runs end to end and writes complete JSON.

Timings are not asserted (they belong to the benchmark, not the tests); completeness, zero
errors and the zero-copy sanity check are. On a fresh machine the first run also builds
MLServer's virtual environment (.bench/venv-mlserver), which takes a minute or two.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from agentd_bench.inference import QUICK

pytestmark = pytest.mark.bench  # a suite end to end: `pytest -m bench`

MODELS = ("decision", "mlp")
PROTOCOLS = {"agentd": ("grpc", "rest", "rest_binary"), "mlserver": ("grpc", "rest")}


@pytest.mark.timeout(660)
def test_bench_inference_quick(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "agentd",
            "bench",
            "inference",
            "--quick",
            "--json",
            "--out-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    document = json.loads(out.stdout)
    assert (tmp_path / "inference-latest.json").is_file()
    assert document["agentd_kserve"] == "ok", document["agentd_kserve"]
    assert document["versions"]["mlserver"] == "1.7.1"

    points = {
        (p["model"], p["server"], p["protocol"], p["concurrency"]): p for p in document["points"]
    }
    for model in MODELS:
        for server, protocols in PROTOCOLS.items():
            for protocol in protocols:
                for concurrency in (1, 16, 64):
                    point = points[(model, server, protocol, concurrency)]
                    # --quick sends a set number per point: every one answered, none failed.
                    assert point["requests"] == QUICK.requests(concurrency), point
                    assert point["errors"] == 0, point
        for protocol in ("grpc", "rest"):
            assert set(document["ratios"][model][protocol]) == {"1", "16", "64"}

    assert {t["name"] for t in document["targets"]} == {
        f"{model}_{protocol}_vs_mlserver" for model in MODELS for protocol in ("grpc", "rest")
    } | {"zero_copy_input_path"}
    zero_copy = document["zero_copy"]
    assert zero_copy["zero_copy_verified"] is True
    assert zero_copy["tensor"]["bytes"] == 4 * 2**20
    assert all(v > 0 for v in zero_copy["input_path_us"].values())
