"""``agentd bench``: run a benchmark suite, print a table (or JSON) and save JSON results.

The suites live outside the runtime package, in a package of their own in the same
distribution (their peers and clients come with the ``bench`` extra); this command finds them
through the ``agentd.bench`` entry point, so nothing in ``agentd`` imports them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["INSTALL_HINT", "SUITES", "bench"]

# The suites this command offers (its public interface); the benchmarks' SUITES implement the
# same names (tests/bench/test_bench_cli.py holds them equal).
SUITES = ("gateway", "inference", "swarm", "generate", "tools", "soak", "cluster", "reload")
INSTALL_HINT = "pip install 'agentd[bench]'"
ENTRY_POINT_GROUP = "agentd.bench"


def bench(
    suite: Annotated[str, typer.Argument(help=f"Suite to run: {', '.join(SUITES)}.")] = "gateway",
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the JSON instead of a table.")
    ] = False,
    quick: Annotated[
        bool, typer.Option("--quick", help="Short runs (about 1 min in all), for tests.")
    ] = False,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            help="Results folder (default: benchmarks/results); created if missing,"
            " checked before the benchmark runs."
        ),
    ] = None,
    minutes: Annotated[
        float | None,
        typer.Option(help="soak only: minutes of mixed traffic (default 30; --quick: 0.5)."),
    ] = None,
    only: Annotated[
        str | None,
        typer.Option(help="gateway only: run one section alone (tracing)."),
    ] = None,
) -> None:
    """Benchmark agentd against peer servers measured in the same run."""
    import math

    from agentd.cli.tools import settings_or_exit
    from agentd.errors import AgentdError, InvalidArgument

    if suite not in SUITES:
        typer.echo(f"error: unknown suite {suite!r}; choose from: {', '.join(SUITES)}", err=True)
        raise typer.Exit(2)
    extra: dict[str, float | str] = {}
    if minutes is not None:
        if suite != "soak":
            typer.echo("error: --minutes is for the soak suite only", err=True)
            raise typer.Exit(2)
        if not (math.isfinite(minutes) and 0 < minutes <= 24 * 60):
            typer.echo(
                f"error: --minutes must be above 0 and at most 1440, not {minutes}", err=True
            )
            raise typer.Exit(2)
        extra["minutes"] = minutes
    if only is not None:
        if suite != "gateway" or only != "tracing":
            typer.echo("error: --only is for the gateway suite: --only tracing", err=True)
            raise typer.Exit(2)
        extra["only"] = only
    settings_or_exit()  # the suites start servers and build tools from these settings
    load_suite = _bench_package()
    try:
        run_suite = load_suite(suite, out_dir)
    except InvalidArgument as exc:  # the only bad argument it checks is the results folder
        typer.echo(f"error: --out-dir: {exc}", err=True)
        raise typer.Exit(2) from None
    except AgentdError as exc:  # e.g. the bench extra is not installed
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    try:
        run_suite(quick=quick, json_out=json_out, results_dir=out_dir, **extra)
    except AgentdError as exc:  # every benchmark error is one
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def _bench_package() -> Callable[..., Any]:
    """The benchmarks' ``load_suite``, or exit with what to install when they are not there."""
    from importlib.metadata import entry_points

    found = entry_points(group=ENTRY_POINT_GROUP, name="load_suite")
    try:
        return next(iter(found)).load()
    except (StopIteration, ImportError):
        typer.echo(f"error: agentd bench needs the benchmarks: {INSTALL_HINT}", err=True)
        raise typer.Exit(1) from None
