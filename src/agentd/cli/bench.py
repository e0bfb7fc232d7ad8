"""``agentd bench``: run a benchmark suite, print a table (or JSON) and save JSON results."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from agentd.bench import SUITES

__all__ = ["bench"]


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
) -> None:
    """Benchmark agentd against peer servers measured in the same run."""
    import importlib
    import math

    from agentd.bench.results import ResultsDirError, check_results_dir
    from agentd.cli.tools import settings_or_exit

    target = SUITES.get(suite)
    if target is None:
        typer.echo(f"error: unknown suite {suite!r}; choose from: {', '.join(SUITES)}", err=True)
        raise typer.Exit(2)
    extra: dict[str, float] = {}
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
    settings_or_exit()  # the suites start servers and build tools from these settings
    try:
        check_results_dir(out_dir)
    except ResultsDirError as exc:
        typer.echo(f"error: --out-dir: {exc}", err=True)
        raise typer.Exit(2) from None
    module_name, func_name = target.split(":")
    module = importlib.import_module(module_name)
    error_type = getattr(module, "BenchError", RuntimeError)
    try:
        getattr(module, func_name)(quick=quick, json_out=json_out, results_dir=out_dir, **extra)
    except error_type as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
