"""`agentd bench soak` runs end to end for a short time: every series is sampled, every kind
of traffic is sent and answered, the plot is a PNG and the verdicts are computed. Whether
the targets are met depends on the machine's load, so that is not asserted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from agentd.bench.soak_requests import KINDS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SERIES = (
    "rss_mb",
    "fds",
    "fds_net",
    "threads",
    "server_cpu_pct",
    "generator_cpu_pct",
    "requests_per_s",
    "server_errors",
    "timeouts",
    "log_mb",
)
TARGETS = {"no_server_errors", "rss_growth", "fds_flat", "threads_flat", "p99_stable"}


def _soak(*args: str, timeout: float = 280) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentd", "bench", "soak", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.timeout(300)  # ~35 s, more if the tool component must be built first
def test_bench_soak_short_run(tmp_path):
    out = _soak("--minutes", "0.3", "--json", "--out-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    document = json.loads(out.stdout)
    assert json.loads((tmp_path / "soak-latest.json").read_text()) == document

    samples = document["samples"]
    assert len(samples) >= 6 and samples[0]["t_s"] == 0
    assert samples[-1]["t_s"] == pytest.approx(document["config"]["duration_s"])
    for sample in samples[1:]:
        for key in SERIES:
            assert sample[key] is not None, (key, sample["t_s"])
        assert sample["healthz_ms"]["count"] > 0
        assert sample["healthz_ms"]["p50"] is not None
        assert "loop_lag_metric_ms" in sample  # None while the server exports no such metric
        assert set(sample["kinds"]) == set(KINDS)
        assert all("p99_ms" in point for point in sample["kinds"].values())
    assert all(s["rss_mb"] > 0 and s["threads"] > 0 and s["fds"] > 0 for s in samples)
    for kind in KINDS:  # every kind has a p99 in some window
        assert any(s["kinds"][kind]["p99_ms"] for s in samples[1:]), kind

    totals = document["totals"]
    for kind in KINDS:
        assert totals[kind]["sent"] > 0, kind
        assert totals[kind]["ok"] > 0, (kind, totals[kind])
    assert totals["openai_stream"]["cut"] > 0  # a third of the streams are left mid-stream
    assert document["swarms"] and all(s["agents"] > 0 for s in document["swarms"])
    assert document["capacity"]["rps"] > 0
    assert document["capacity"]["target_rps"] == pytest.approx(
        document["capacity"]["rps"] * 0.8, abs=0.1
    )
    assert document["server"]["exit_code"] == 0

    targets = {t["name"]: t for t in document["targets"]}
    assert set(targets) == TARGETS
    for target in targets.values():
        assert isinstance(target["met"], bool)
        assert "value" in target and "threshold" in target
    assert targets["no_server_errors"]["value"] >= 0
    assert targets["rss_growth"]["value"] is not None
    assert set(document["p99_windows"]) == set(KINDS)

    png = tmp_path / document["plot"].rsplit("/", 1)[-1]
    assert png.is_file() and (tmp_path / "soak-latest.png").is_file()
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    import matplotlib.image

    pixels = matplotlib.image.imread(png)  # decodes: a valid PNG, not just its signature
    assert pixels.shape[0] > 500 and pixels.shape[1] > 500


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--minutes", "0"], "--minutes must be above 0"),
        (["--minutes", "nan"], "--minutes must be above 0"),
        (["--minutes", "2000"], "at most 1440"),
    ],
)
def test_bench_soak_minutes_checked(tmp_path, args, message):
    out = _soak(*args, "--out-dir", str(tmp_path), timeout=60)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
    assert not list(tmp_path.iterdir())


def test_bench_minutes_only_for_soak(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "agentd", "bench", "tools", "--minutes", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "--minutes is for the soak suite only" in out.stderr
