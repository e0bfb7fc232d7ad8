"""``agentd cluster``: look at an etcd cluster (status), mark zones down (failover) and run
a local multi-node cluster for development (up)."""

from __future__ import annotations

import asyncio
import json
import re
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from agentd.cluster.etcd import EtcdClient

__all__ = ["cluster"]

cluster = typer.Typer(
    name="cluster",
    help="A cluster on etcd: status, zone failover, a local cluster for development.",
    no_args_is_help=True,
)

ETCD_TIMEOUT_S = 3.0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")  # as settings' zone and cluster

EtcdOption = Annotated[
    str | None,
    typer.Option("--etcd", help="etcd URL (default: AGENTD_ETCD, else http://127.0.0.1:2379)."),
]
ClusterOption = Annotated[
    str | None, typer.Option("--cluster", help="Cluster name (default: AGENTD_CLUSTER or agentd).")
]


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _where(etcd: str | None, name: str | None) -> tuple[str, str, int]:
    """The etcd URL, cluster name and partition count: flags over settings."""
    from agentd.cli.tools import settings_or_exit

    settings = settings_or_exit(cluster=name)
    return etcd or settings.etcd or "http://127.0.0.1:2379", settings.cluster, settings.partitions


def _run(work: Any) -> Any:
    """Run ``work`` (a coroutine); etcd's errors become one line: a bad URL exits 2,
    etcd unreachable exits 1."""
    from agentd.errors import InvalidArgument, Unavailable

    try:
        return asyncio.run(work)
    except InvalidArgument as error:
        raise _fail(str(error), 2) from None
    except Unavailable as error:
        raise _fail(f"{error} (is etcd running? --etcd URL)", 1) from None


async def _client(url: str) -> EtcdClient:
    from agentd.cluster.etcd import EtcdClient

    client = EtcdClient(url, timeout=ETCD_TIMEOUT_S)
    try:
        await client.connect()
    except BaseException:
        await client.aclose()
        raise
    return client


# -- status --------------------------------------------------------------------------------


def _number(data: dict[str, Any], key: str) -> float | None:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


async def _status(url: str, name: str, partitions: int) -> dict[str, Any]:
    from agentd.cluster.coordinator import ClusterKeys, parse_decision, parse_failover
    from agentd.cluster.scaling import parse_status

    keys = ClusterKeys(name)
    client = await _client(url)
    try:
        items, revision = await client.get_prefix(keys.root)  # one read: one revision
        nodes: dict[str, dict[str, Any]] = {}
        owners: dict[int, str] = {}
        ignored: list[dict[str, str]] = []
        coordinator = decision = None
        down: list[str] = []
        for item in items:
            try:
                if item.key.startswith(keys.nodes):
                    data = json.loads(item.value)
                    parse_status(data)  # refuses what the coordinator would refuse
                    nodes[item.key.removeprefix(keys.nodes)] = data
                elif item.key.startswith(keys.partitions):
                    index = int(item.key.removeprefix(keys.partitions))
                    if not 0 <= index < partitions:
                        raise ValueError(f"partition {index} is not below {partitions}")
                    owners[index] = item.value.decode()
                elif item.key == keys.coordinator:
                    coordinator = json.loads(item.value)
                    if not isinstance(coordinator, dict) or not isinstance(
                        coordinator.get("id"), str
                    ):
                        raise ValueError('expected {"id": node, ...}')
                elif item.key == keys.decision:
                    decision = parse_decision(item.value)
                elif item.key == keys.failover:
                    down = sorted(parse_failover(item.value))
            except ValueError as error:  # JSON, UTF-8 and int() errors are ValueErrors
                ignored.append({"key": item.key, "error": str(error)[:200]})
        ttls = await asyncio.gather(
            *(_lease_left(client, data.get("lease")) for data in nodes.values())
        )
    finally:
        await client.aclose()
    per_node: dict[str, int] = {}
    for owner in owners.values():
        per_node[owner] = per_node.get(owner, 0) + 1
    rows = []
    for (key, data), ttl in zip(nodes.items(), ttls, strict=True):
        node_id = str(data["id"])
        rows.append(
            {
                "id": node_id,
                "key": key,
                "zone": data.get("zone", "default"),
                "peer": data.get("peer") if isinstance(data.get("peer"), str) else None,
                **{
                    field: _number(data, field)
                    for field in (
                        "load",
                        "run_queue",
                        "active_agents",
                        "tokens_per_s",
                        "queue_time_s",
                        "kv_blocks_used",
                        "kv_blocks_total",
                    )
                },
                "lease_ttl_s": ttl,
                "partitions": per_node.get(node_id, 0),
                "zone_down": data.get("zone", "default") in down,
            }
        )
    live = {row["id"] for row in rows}
    return {
        "cluster": name,
        "etcd": url,
        "revision": revision,
        "nodes": rows,
        "partitions": {
            "total": partitions,
            "owned": len(owners),
            "unowned": partitions - len(owners),
            "owner_not_live": sum(1 for owner in owners.values() if owner not in live),
        },
        "coordinator": coordinator,
        "decision": decision,
        "down_zones": down,
        "ignored": ignored,
    }


async def _lease_left(client: EtcdClient, lease: object) -> int | None:
    if isinstance(lease, bool) or not isinstance(lease, int) or lease <= 0:
        return None
    return await client.lease_time_to_live(lease)


def _show(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    # Wide enough that peers and node ids are never cut (a pipe defaults to 80 columns);
    # the table itself takes only the width its cells need.
    console = Console(highlight=False, width=max(Console().width, 200))
    parts = report["partitions"]
    console.print(
        f"cluster {report['cluster']} at {report['etcd']} (revision {report['revision']}): "
        f"{len(report['nodes'])} nodes, {parts['owned']}/{parts['total']} partitions owned, "
        f"{parts['unowned']} unowned",
        markup=False,
        soft_wrap=True,
    )
    table = Table(box=None, pad_edge=False)
    for title in (
        "node",
        "zone",
        "peer",
        "load",
        "run queue",
        "agents",
        "lease left",
        "partitions",
    ):
        table.add_column(title, justify="left" if title in ("node", "zone", "peer") else "right")

    def number(value: float | None, form: str = "{:g}") -> str:
        return "-" if value is None else form.format(value)

    for row in report["nodes"]:
        table.add_row(
            row["id"],
            row["zone"] + (" (down)" if row["zone_down"] else ""),
            row["peer"] or "-",
            number(row["load"], "{:.2f}"),
            number(row["run_queue"]),
            number(row["active_agents"]),
            "-" if row["lease_ttl_s"] is None else f"{row['lease_ttl_s']}s",
            str(row["partitions"]),
        )
    if report["nodes"]:
        console.print(table)
    coordinator = report["coordinator"]
    console.print(f"coordinator: {coordinator['id'] if coordinator else 'none'}", markup=False)
    decision = report["decision"]
    if decision is None:
        console.print("scaling: no decision yet", markup=False)
    else:
        console.print(
            f"scaling: desired {decision['desired']} nodes (current {decision['current']}, "
            f"{decision['reason']}) by {decision.get('by', '?')} at revision "
            f"{decision['revision']}",
            markup=False,
            soft_wrap=True,
        )
    console.print(f"zones down: {', '.join(report['down_zones']) or 'none'}", markup=False)
    if parts["owner_not_live"]:
        console.print(f"partitions owned by no live node: {parts['owner_not_live']}")
    for item in report["ignored"]:
        console.print(f"ignored {item['key']}: {item['error']}", markup=False, soft_wrap=True)


@cluster.command("status")
def status(
    etcd: EtcdOption = None,
    name: ClusterOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Nodes, zones, leases, partitions per node, the coordinator and its last decision."""
    url, name, partitions = _where(etcd, name)
    report = _run(_status(url, name, partitions))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        _show(report)


# -- failover ------------------------------------------------------------------------------


async def _failover(url: str, name: str, zone: str, clear: bool) -> list[str]:
    from agentd.cluster.coordinator import ClusterKeys, parse_failover

    key = ClusterKeys(name).failover
    client = await _client(url)
    try:
        for _ in range(10):  # a compare-and-swap loop against other writers
            got = await client.get(key)
            down: set[str] = set()
            if got is not None:
                try:
                    down = set(parse_failover(got[0]))
                except ValueError as error:
                    typer.echo(f"warning: replacing a malformed {key}: {error}", err=True)
            down = down - {zone} if clear else down | {zone}
            value = json.dumps({"down": sorted(down)}).encode()
            if await client.compare_and_swap(key, value, 0 if got is None else got[1]):
                return sorted(down)
    finally:
        await client.aclose()
    raise typer.Exit(1)


@cluster.command("failover")
def failover(
    zone: Annotated[str, typer.Option("--zone", help="The zone to mark down (or up).")],
    clear: Annotated[bool, typer.Option("--clear", help="Mark the zone up again.")] = False,
    etcd: EtcdOption = None,
    name: ClusterOption = None,
) -> None:
    """Mark a zone down (its partitions move to other zones) or, with --clear, up again."""
    if not _NAME.match(zone):
        raise _fail(
            f"--zone {zone[:80]!r}: a zone name is 1-63 letters, digits, '.', '_' or '-'", 2
        )
    url, name, _ = _where(etcd, name)
    down = _run(_failover(url, name, zone, clear))
    typer.echo(f"zones down: {', '.join(down) or 'none'}")


# -- up ------------------------------------------------------------------------------------


@cluster.command("up")
def up(
    nodes: Annotated[int, typer.Option("--nodes", help="Nodes to start with.")] = 3,
    min_nodes: Annotated[
        int | None, typer.Option("--min", help="Fewest nodes a decision may leave (default 1).")
    ] = None,
    max_nodes: Annotated[
        int | None, typer.Option("--max", help="Most nodes a decision may start (default 2N).")
    ] = None,
    base_port: Annotated[
        int, typer.Option("--base-port", help="Node i serves on base port + i.")
    ] = 8080,
    name: Annotated[str, typer.Option("--cluster", help="Cluster name.")] = "dev",
) -> None:
    """A local multi-node cluster for development: etcd (and Redis when installed) on free
    loopback ports, N nodes on consecutive ports, scaled by the coordinator's decisions."""
    low = 1 if min_nodes is None else min_nodes
    high = max(2 * nodes, low) if max_nodes is None else max_nodes
    if not 1 <= nodes <= 64:
        raise _fail(f"--nodes {nodes}: between 1 and 64 nodes on one machine", 2)
    if not 1 <= low <= high <= 64:
        raise _fail(f"--min {low} --max {high}: expected 1 <= min <= max <= 64", 2)
    if not low <= nodes <= high:
        raise _fail(f"--nodes {nodes} is outside --min {low} --max {high}", 2)
    if not 1 <= base_port <= 65535 - (high - 1):
        raise _fail(
            f"--base-port {base_port}: ports {base_port}..{base_port + high - 1} "
            "must be between 1 and 65535",
            2,
        )
    if not _NAME.match(name):
        raise _fail(f"--cluster {name[:80]!r}: 1-63 letters, digits, '.', '_' or '-'", 2)
    from agentd.cli.cluster_up import UpError, run_up
    from agentd.errors import AgentdError

    try:
        run_up(nodes=nodes, min_nodes=low, max_nodes=high, base_port=base_port, cluster=name)
    except (UpError, AgentdError, OSError) as error:
        raise _fail(str(error), 1) from None
