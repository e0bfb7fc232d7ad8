"""`agentd bench soak` runs end to end for a short time: every series is sampled, every kind
of traffic is sent and answered, the plot is a PNG and the verdicts are computed. Whether
the targets are met depends on the machine's load, so that is not asserted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from agentd_bench.soak_requests import KINDS

pytestmark = pytest.mark.bench  # a suite end to end: `pytest -m bench`

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


@pytest.mark.timeout(300)  # ~15 s, more if the tool component must be built first
def test_bench_soak_short_run(tmp_path):
    out = _soak("--minutes", "0.1", "--json", "--out-dir", str(tmp_path))
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


def _samples(rss: list[float], fds: list[int], threads: list[int]) -> list[dict]:
    return [
        {"t_s": 10.0 * i, "rss_mb": r, "fds": f, "fds_net": f, "threads": t}
        for i, (r, f, t) in enumerate(zip(rss, fds, threads, strict=True))
    ]


def _measured(samples: list[dict], latencies: list[dict[str, list[float]]]) -> dict:
    from agentd_bench.soak_report import COUNTS, p99_windows

    duration = samples[-1]["t_s"]
    times = [s["t_s"] for s in samples]
    return {
        "samples": samples,
        "config": {"warmup_s": 20.0, "window_s": 20.0},
        "totals": {k: dict.fromkeys(COUNTS, 0) for k in KINDS},
        "p99_windows": p99_windows(times, latencies, 20.0, duration),
    }


def test_soak_verdicts_from_samples():
    """The verdicts' arithmetic on made-up samples: RSS growth from the warm-up sample, an
    upward step in descriptors caught, flat threads passed, p99 windows compared."""
    from agentd_bench.soak_report import targets

    rss = [300, 400, 400, 404, 405, 406, 407, 408, 409, 410, 411]
    fds = [40, 50, 50, 50, 50, 50, 51, 60, 70, 80, 90]
    threads = [20, 26, 26, 26, 26, 26, 26, 26, 26, 26, 27]
    fast, slow = [0.010] * 50, [0.010] * 45 + [0.030] * 5
    latencies = [{}] + [{"grpc_unary": fast}] * 8 + [{"grpc_unary": slow}] * 2
    verdicts = {t["name"]: t for t in targets(_measured(_samples(rss, fds, threads), latencies))}
    assert verdicts["no_server_errors"]["met"] and verdicts["no_server_errors"]["value"] == 0
    assert verdicts["rss_growth"]["reference_mb"] == 400  # the sample at 20 s, not the start
    assert verdicts["rss_growth"]["value"] == pytest.approx(2.75)
    assert verdicts["rss_growth"]["met"]
    assert not verdicts["fds_flat"]["met"] and verdicts["fds_flat"]["value"] == 90 - 50
    assert verdicts["threads_flat"]["met"]  # +1 is within the tolerance of 2
    assert verdicts["p99_stable"]["ratios"] == {"grpc_unary": 3.0}
    assert not verdicts["p99_stable"]["met"]

    few = [{}] + [{"grpc_unary": [0.01] * 5}] * 10  # 10 answers per window: not compared
    verdicts = {t["name"]: t for t in targets(_measured(_samples(rss, fds, threads), few))}
    assert verdicts["p99_stable"]["ratios"] == {} and not verdicts["p99_stable"]["met"]
