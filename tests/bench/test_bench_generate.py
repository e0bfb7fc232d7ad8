"""`agentd bench generate --quick` runs end to end and writes complete JSON (timings are the
benchmark's business, not asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from agentd_bench.generate import QUICK_MAX_TOKENS, QUICK_REPEATS

pytestmark = pytest.mark.bench  # a suite end to end: `pytest -m bench`


def test_bench_generate_quick(tmp_path):
    command = ["agentd", "bench", "generate", "--quick", "--json", "--out-dir", str(tmp_path)]
    out = subprocess.run(
        [sys.executable, "-m", *command], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    document = json.loads(out.stdout)
    assert (tmp_path / "generate-latest.json").is_file()
    batching = document["batching"]
    assert (batching["max_tokens"], batching["repeats"]) == (QUICK_MAX_TOKENS, QUICK_REPEATS)
    for streams, point in batching["continuous"].items():
        assert point["streams"] == int(streams)
        assert point["tokens"] == int(streams) * batching["max_tokens"]
        assert point["tokens_per_s"] > 0 and point["ttft"]["p50_ms"] > 0
    assert batching["one_at_a_time_32"]["tokens"] == 32 * batching["max_tokens"]
    # The 32-stream comparison runs as interleaved pairs; the target is their median ratio.
    assert len(batching["ratios_32"]) == QUICK_REPEATS
    assert batching["ratio_32"] == sorted(batching["ratios_32"])[QUICK_REPEATS // 2]
    assert batching["lanes"] >= 1
    cache = document["cache"]
    assert cache["pooled"]["p99_ms"] > 0 and cache["concatenated"]["p99_ms"] > 0
    long = document["long_prompt"]
    assert long["chunked"]["prefill_tokens"] < long["prompt_tokens"]
    assert long["whole"]["prefill_tokens"] == long["prompt_tokens"]
    for case in ("chunked", "whole"):
        assert long[case]["long_ttft_ms"] > 0 and long[case]["running_max_gap_ms"] > 0
    peer = document["peer"]
    assert "skipped" not in peer, peer.get("skipped")  # the dev extra installs what it needs
    assert set(peer["single_stream"]) == {"agentd", *peer["peers"]}
    assert "llama.cpp f16" in peer["peers"]
    spec = peer["spec"]
    for name in ("agentd", *peer["peers"]):  # both servers answered every request in full
        (single,) = peer["single_stream"][name]["runs"]
        assert single > 0
        (load,) = peer["concurrent_runs"][name]
        assert load["requests"] == spec["concurrent"]
        assert load["tokens"] == spec["concurrent"] * spec["concurrent_tokens"]
        assert load["chunks"] >= load["tokens"] and load["tokens_per_s"] > 0
    for mode in ("batched", "serial"):
        (run,) = peer["gguf_runs"][mode]
        assert run["tokens"] == spec["concurrent"] * spec["concurrent_tokens"]
    for cache in ("on", "off"):
        ttft = peer["prefix_ttft_ms"][cache]
        assert ttft["samples"] == spec["ttft_requests"] and ttft["p50_ms"] > 0
    assert {t["name"] for t in document["targets"]} == {
        "continuous_batching",
        "pooled_kv_cache",
        "peer_single_stream",
        "peer_concurrent",
        "prefix_cache_ttft",
        "gguf_batched",
    }
