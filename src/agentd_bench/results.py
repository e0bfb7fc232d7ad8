"""Benchmark result files: machine description, timestamped JSON plus a ``-latest`` copy."""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console

from agentd.errors import InvalidArgument
from agentd_bench.errors import BenchError

__all__ = [
    "DEFAULT_RESULTS_DIR",
    "ResultsDirError",
    "check_results_dir",
    "machine_info",
    "package_versions",
    "render_sections",
    "run_and_publish",
    "utc_stamp",
    "write_results",
]

DEFAULT_RESULTS_DIR = Path("benchmarks/results")


class ResultsDirError(BenchError, InvalidArgument):
    """The results folder cannot be created or written to."""


def check_results_dir(results_dir: Path | None = None) -> Path:
    """Create the results folder when missing and make sure a file can be written in it, so
    a bad folder is refused before a benchmark runs rather than after (losing the run)."""
    results_dir = results_dir or DEFAULT_RESULTS_DIR
    if results_dir.exists() and not results_dir.is_dir():
        raise ResultsDirError(f"results folder {results_dir} exists and is not a directory")
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ResultsDirError(
            f"cannot create results folder {results_dir}: {exc.strerror or exc}"
        ) from None
    try:
        with tempfile.NamedTemporaryFile(dir=results_dir, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise ResultsDirError(
            f"cannot write in results folder {results_dir}: {exc.strerror or exc}"
        ) from None
    return results_dir


def utc_stamp(now: datetime | None = None) -> str:
    """A file-name-safe UTC timestamp, e.g. ``20250101T120000Z``."""
    return (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine_info() -> dict[str, Any]:
    """What a reader needs to judge absolute numbers: cores, CPU, Python, OS."""
    usable: int | None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "cpu_model": _cpu_model(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
    }


def package_versions(names: list[str]) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_results(
    suite: str, doc: dict[str, Any], results_dir: Path | None = None, stamp: str | None = None
) -> Path:
    """Write ``<suite>-<stamp>.json`` and ``<suite>-latest.json``; return the stamped path."""
    results_dir = results_dir or DEFAULT_RESULTS_DIR
    results_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, indent=2) + "\n"
    stamp = stamp or utc_stamp()
    path = results_dir / f"{suite}-{stamp}.json"
    path.write_text(text, encoding="utf-8")
    # Written via a temporary name so a reader never sees a half-written latest file.
    latest = results_dir / f"{suite}-latest.json"
    tmp = latest.with_suffix(".json.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(latest)
    return path


def run_and_publish(
    suite: str,
    *,
    measure: Callable[[Callable[[str], None]], Any],
    build: Callable[[Any, datetime], dict[str, Any]],
    render: Callable[[dict[str, Any], Console], None],
    json_out: bool,
    results_dir: Path | None,
    console: Console | None = None,
) -> dict[str, Any]:
    """The frame every suite shares: measure (telling progress on stderr), build the JSON
    document, write the result files, then print the JSON (``json_out``) or a table."""
    console = console or Console()
    progress_console = Console(stderr=True, highlight=False)

    def progress(line: str) -> None:
        progress_console.print(f"[dim]{line}[/dim]", soft_wrap=True)

    check_results_dir(results_dir)  # before measuring: a bad folder must not cost the run
    now = datetime.now(UTC)
    doc = build(measure(progress), now)
    path = write_results(suite, doc, results_dir, stamp=utc_stamp(now))
    where = f"wrote {path} (and {path.parent / f'{suite}-latest.json'})"
    if json_out:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        progress(where)
    else:
        render(doc, console)
        console.print(where, soft_wrap=True)
    return doc


def render_sections(
    suite: str,
    document: dict[str, Any],
    console: Console,
    figures: Callable[[str, dict[str, Any]], str],
) -> None:
    """The table of a suite whose document has ``sections`` (each with its ``targets``, or
    ``skipped`` / ``failed`` and why): a row per section, ``figures(name, section)`` as its
    figures and each target marked met or NOT met."""
    from rich.table import Table

    table = Table(title=f"agentd bench {suite}{' (quick)' if document['quick'] else ''}")
    for column in ("section", "figures", "targets"):
        table.add_column(column, overflow="fold")
    for name, section in document["sections"].items():
        if "skipped" in section or "failed" in section:
            why = section.get("skipped") or section.get("failed")
            table.add_row(name, f"not run: {why}", "")
            continue
        marks = "\n".join(
            f"{t['description']}: {t['value']} {'met' if t['met'] else 'NOT met'}"
            for t in section["targets"]
        )
        table.add_row(name, figures(name, section), marks or "reported, no target")
    console.print(table)
