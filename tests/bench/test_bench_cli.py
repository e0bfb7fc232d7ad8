"""`agentd bench` and the benchmarks' package: found through the entry point, refused with
what to install when the bench extra (or the package itself) is not there, and every error
it raises in agentd's one error tree."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import venv
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import agentd_bench
from agentd.cli.bench import INSTALL_HINT, SUITES
from agentd.errors import AgentdError, Code
from agentd_bench.errors import BenchError, MissingExtra
from agentd_bench.results import ResultsDirError, check_results_dir
from agentd_bench.servers import ServerError

SITE_PACKAGES = Path(next(p for p in sys.path if p.endswith("site-packages")))


def test_the_command_offers_the_suites_the_package_has() -> None:
    assert tuple(agentd_bench.SUITES) == SUITES


def test_the_entry_point_is_the_package_loader() -> None:
    (found,) = entry_points(group="agentd.bench", name="load_suite")
    assert found.load() is agentd_bench.load_suite


def test_the_bench_extra_is_installed_here() -> None:
    assert agentd_bench.missing_extra() == []


def test_benchmark_errors_are_agentd_errors(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ResultsDirError) as caught:
        check_results_dir(tmp_path / "afile")
    assert isinstance(caught.value, AgentdError) and caught.value.code is Code.INVALID_ARGUMENT
    assert ServerError("down").code is Code.UNAVAILABLE
    assert MissingExtra(["fastapi"]).code is Code.FAILED_PRECONDITION
    # One BenchError for every suite, so that `agentd bench` reports any of them.
    for target in agentd_bench.SUITES.values():
        module = __import__(target.split(":")[0], fromlist=["BenchError"])
        assert module.BenchError is BenchError
    assert issubclass(BenchError, AgentdError)


# --- an environment without the bench extra ------------------------------------------------


def _environment_without(tmp_path: Path, hidden: Callable[[str], bool]) -> Path:
    """A virtual environment holding this one's packages (as links) except the hidden ones:
    a real interpreter start, nothing patched, in which those packages are not installed."""
    root = tmp_path / "venv"
    venv.create(root, with_pip=False)
    site = next((root / "lib").glob("python3*/site-packages"))
    for entry in SITE_PACKAGES.iterdir():
        if not hidden(entry.name.lower()):
            (site / entry.name).symlink_to(entry)
    return root / "bin" / "python"


def _without_fastapi(name: str) -> bool:
    return name == "fastapi" or name.startswith("fastapi-")


def _without_the_package_metadata(name: str) -> bool:
    # The source is still on the path (the editable install's .pth); only the installed
    # distribution, and so its entry points, are gone.
    return name.startswith("agentd-") and name.endswith(".dist-info")


def _agentd(python: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(python), "-m", "agentd", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200"},
    )


@pytest.mark.parametrize("suite", ["gateway", "tools"])
def test_without_the_bench_extra_it_says_what_to_install(tmp_path: Path, suite: str) -> None:
    python = _environment_without(tmp_path, _without_fastapi)
    started = time.monotonic()
    out = _agentd(python, "bench", suite, "--quick", "--out-dir", "results", cwd=tmp_path)
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr)
    assert out.stderr.strip().splitlines() == [
        f"error: agentd bench needs the bench extra (cannot import fastapi): {INSTALL_HINT}"
    ]
    assert time.monotonic() - started < 30  # refused before any benchmark ran
    assert list((tmp_path / "results").iterdir()) == []
    # Help needs no extra; nor does the rest of agentd.
    out = _agentd(python, "bench", "--help", cwd=tmp_path)
    assert out.returncode == 0 and f"Suite to run: {', '.join(SUITES)}." in out.stdout


def test_without_the_benchmark_package_it_says_what_to_install(tmp_path: Path) -> None:
    python = _environment_without(tmp_path, _without_the_package_metadata)
    out = _agentd(python, "bench", "tools", "--quick", "--out-dir", "results", cwd=tmp_path)
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr)
    assert out.stderr.strip().splitlines() == [
        f"error: agentd bench needs the benchmarks: {INSTALL_HINT}"
    ]
