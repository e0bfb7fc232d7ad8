"""The ``agentd`` command line. Each command imports what it needs when it runs."""

from __future__ import annotations

import typer

from agentd.cli.bench import bench
from agentd.cli.call import call
from agentd.cli.cluster import cluster
from agentd.cli.models import models
from agentd.cli.plugins import plugins
from agentd.cli.serve import serve
from agentd.cli.swarm import swarm
from agentd.cli.tools import tools
from agentd.cli.top import top

app = typer.Typer(
    name="agentd",
    help="agentd: a runtime and gateway for AI agents at high concurrency.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command()(serve)
app.command()(call)
app.command()(bench)
app.command()(models)
app.command()(swarm)
app.command()(top)
app.add_typer(tools)
app.add_typer(cluster)
app.add_typer(plugins)


@app.command()
def version() -> None:
    """Print the agentd version."""
    from agentd import __version__

    typer.echo(__version__)


def main() -> None:
    app()


__all__ = ["app", "main"]
