"""``agentd swarm``: N agents decide with the built-in model and report to a collector."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from agentd.swarm import SwarmResult

__all__ = ["swarm"]

MAX_WORKERS = 1_000_000
MAX_PROCESSES = 64


def swarm(
    agents: Annotated[int, typer.Option("--agents", "-n", help="Number of agents.")] = 100_000,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    persist: Annotated[
        bool,
        typer.Option(
            "--persist/--no-persist",
            help="Persist agent state in SQLite (--no-persist: in memory; refuses --state-path).",
        ),
    ] = True,
    state_path: Annotated[
        Path | None,
        typer.Option(
            help="SQLite file (default: a temporary one). Created if missing; an existing file"
            " must be a SQLite database."
        ),
    ] = None,
    workers: Annotated[
        int, typer.Option(help=f"Worker tasks running turns (1 to {MAX_WORKERS:,}).")
    ] = 8192,
    processes: Annotated[
        int,
        typer.Option(
            help=f"Node processes the agents are spread over (1 to {MAX_PROCESSES});"
            " they share the SQLite file."
        ),
    ] = 1,
) -> None:
    """Run the multi-agent demo in-process: each agent gets a start message, asks the
    `decision` model (batched across agents), and reports to a collector that checks it
    heard from every agent exactly once."""
    if agents < 1:
        typer.echo("error: --agents must be at least 1", err=True)
        raise typer.Exit(2)
    if not 1 <= workers <= MAX_WORKERS:
        typer.echo(
            f"error: --workers must be between 1 and {MAX_WORKERS:,}, not {workers}", err=True
        )
        raise typer.Exit(2)
    if not 1 <= processes <= MAX_PROCESSES:
        typer.echo(
            f"error: --processes must be between 1 and {MAX_PROCESSES}, not {processes}",
            err=True,
        )
        raise typer.Exit(2)
    if state_path is not None and not persist:
        typer.echo(
            "error: --state-path is unused with --no-persist (state stays in memory);"
            " drop one of them",
            err=True,
        )
        raise typer.Exit(2)
    if state_path is not None:
        from agentd.server.envoy import ConfigError
        from agentd.server.preflight import check_state_store

        try:
            check_state_store(state_path)  # the same check serve runs; writes nothing
        except ConfigError as exc:
            typer.echo(f"error: --state-path: {exc}", err=True)
            raise typer.Exit(2) from None
    import sqlite3

    from agentd.errors import StartupError

    try:
        result = _run(agents, persist, state_path, workers, json_out, processes)
    except StartupError as exc:  # a process of --processes N failed
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except (sqlite3.Error, OSError) as exc:
        where = f" ({state_path})" if state_path is not None else ""
        typer.echo(f"error: agent state store{where}: {exc}", err=True)
        raise typer.Exit(1) from None
    if json_out:
        typer.echo(json.dumps(result.as_dict(), indent=2))
    else:
        _print(result)
    if not result.ok:
        raise typer.Exit(1)


def _run(
    agents: int,
    persist: bool,
    state_path: Path | None,
    workers: int,
    json_out: bool,
    processes: int = 1,
) -> SwarmResult:
    import uvloop
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from agentd.swarm import run_swarm
    from agentd.swarm.gc_policy import many_objects_gc

    console = Console(stderr=True)
    total_turns = 2 * agents  # each agent's turn plus the collector's turn for it
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=json_out,
        transient=True,
    ) as bar:
        task = bar.add_task("turns", total=total_turns)

        def progress(turns: int) -> None:
            bar.update(task, completed=turns)

        if processes > 1:
            from agentd.swarm.multi import run_swarm_processes

            return uvloop.run(
                run_swarm_processes(
                    agents,
                    processes,
                    persist=persist,
                    state_path=state_path,
                    workers=workers,
                    # the collector's count of reports: a decider's turn and its own each
                    progress=lambda reports: progress(2 * reports),
                )
            )
        with many_objects_gc():
            result = uvloop.run(
                run_swarm(
                    agents,
                    persist=persist,
                    state_path=state_path,
                    workers=workers,
                    progress=progress,
                )
            )
    return result


def _print(result: SwarmResult) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"swarm of {result.agents:,} agents", show_header=False)
    rows = [
        ("result", "ok" if result.ok else "MISMATCH"),
        ("distinct results / duplicates", f"{result.distinct_results:,} / {result.duplicates}"),
        ("wall time", f"{result.wall_s:.2f} s"),
        ("decisions/s", f"{result.decisions_per_s:,.0f}"),
        ("peak RSS", _peak_rss(result)),
        ("bytes per agent", f"{result.bytes_per_agent:,.0f}"),
        ("turn latency p50 / p99", f"{result.turn_p50_ms:.1f} / {result.turn_p99_ms:.1f} ms"),
        ("inference runs (mean batch)", f"{result.inference_runs:,} ({result.mean_batch:,.0f})"),
        ("state writes", f"{result.store_writes:,} ({'SQLite' if result.persistence else 'off'})"),
        ("actions", ", ".join(f"{k} {v:,}" for k, v in result.actions.items())),
    ]
    if result.processes > 1:
        rows.append(("collector shards", f"{result.collector_shards}"))
        each = ", ".join(
            f"{cpu:.2f} s / {done:.2f} s"
            for cpu, done in zip(result.process_cpu_s, result.process_finished_s, strict=True)
        )
        rows.append(("CPU / own shards done, per process", each))
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)


def _peak_rss(result: SwarmResult) -> str:
    total = f"{result.peak_rss_mb:,.0f} MB"
    if result.processes == 1:
        return total
    each = ", ".join(f"{mb:,.0f}" for mb in result.process_peak_rss_mb)
    return f"{total} in {result.processes} processes ({each} MB)"
