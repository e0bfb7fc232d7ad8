"""The coordinator: one node of an etcd cluster, elected, writes the scaling decision.

Every node runs a :class:`Coordinator`. Each campaigns by creating
``/agentd/<cluster>/coordinator`` under a lease of its own; the one that created it leads
until its lease ends (it closes, its process dies, or it cannot reach etcd for a TTL), and
the others watch the key and campaign again when it vanishes. Every ``scale_interval_s``
the leader reads the nodes' statuses (``nodes/``), the zones marked down
(``scale/zone/failover``) and the last decision (``scale/horizontal``), runs the scaling
rule (:mod:`agentd.cluster.scaling`) and writes the new decision with a compare-and-swap
on the decision's ``mod_revision`` it read: two nodes that both believe they lead (for
the moment a lease takes to expire) cannot both write a decision after the same one; the
loser re-reads. Every node (leader or not) watches the decision and reports its desired
count (``agentd_cluster_desired_nodes``), for an HPA or KEDA rule or ``agentd cluster up``.

Malformed statuses, decisions and failover markers are logged (once per revision) and
ignored, never a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from agentd.cluster.etcd import EtcdClient, EventKind, Lease, LeaseLost, WatchCompacted, WatchEvent
from agentd.cluster.scaling import (
    Decision,
    NodeStatus,
    Recommendation,
    ScalingPolicy,
    desired_nodes,
    parse_status,
    remember,
)
from agentd.errors import Unavailable
from agentd.observability.cluster_metrics import NO_METRICS, ClusterObserver
from agentd.settings import Settings

__all__ = [
    "ClusterKeys",
    "Coordinator",
    "Snapshot",
    "parse_decision",
    "parse_failover",
    "policy_from_settings",
]

log = logging.getLogger(__name__)

RETRY_S = 0.5  # pause before trying etcd again after it failed
CLOSE_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class ClusterKeys:
    """Where a cluster keeps its state in etcd."""

    cluster: str

    @property
    def root(self) -> str:
        return f"/agentd/{self.cluster}/"

    @property
    def nodes(self) -> str:
        return self.root + "nodes/"

    @property
    def partitions(self) -> str:
        return self.root + "partitions/"

    @property
    def coordinator(self) -> str:
        return self.root + "coordinator"

    @property
    def decision(self) -> str:
        return self.root + "scale/horizontal"

    @property
    def failover(self) -> str:
        return self.root + "scale/zone/failover"


def policy_from_settings(settings: Settings) -> ScalingPolicy:
    return ScalingPolicy(
        min_nodes=settings.min_nodes,
        max_nodes=settings.max_nodes,
        target_utilization=settings.target_utilization,
        queue_time_target_s=settings.queue_time_target_s,
        kv_occupancy_target=settings.kv_occupancy_target,
        tolerance=settings.scale_tolerance,
        scale_down_stabilization_s=settings.scale_down_stabilization_s,
        max_scale_up_factor=settings.max_scale_up_factor,
    )


@contextlib.asynccontextmanager
async def _closing(events: AsyncIterator[WatchEvent]) -> AsyncIterator[None]:
    # Leaving an ``async for`` early does not close an async generator (its watch would
    # stay open until garbage collection): close it here.
    try:
        yield
    finally:
        close = getattr(events, "aclose", None)
        if close is not None:
            await close()


def _decode(value: bytes) -> Any:
    return json.loads(value.decode())  # UnicodeDecodeError and JSONDecodeError: ValueError


def parse_decision(value: bytes) -> dict[str, Any]:
    """A decision's JSON (``scale/horizontal``); ValueError if malformed."""
    data = _decode(value)
    if not isinstance(data, dict):
        raise ValueError("a decision must be a JSON object")
    for key in ("desired", "current", "revision"):
        number = data.get(key)
        if isinstance(number, bool) or not isinstance(number, int) or number < 0:
            raise ValueError(f"{key} must be a non-negative integer, not {number!r}")
    if not isinstance(data.get("reason"), str):
        raise ValueError(f"reason must be a string, not {data.get('reason')!r}")
    at = data.get("at")
    if isinstance(at, bool) or not isinstance(at, int | float):
        raise ValueError(f"at must be a number (Unix time), not {at!r}")
    return data


def parse_failover(value: bytes) -> frozenset[str]:
    """The zones marked down (``scale/zone/failover`` = ``{"down": [zones]}``)."""
    data = _decode(value)
    down = data.get("down") if isinstance(data, dict) else None
    if not isinstance(down, list) or not all(isinstance(z, str) and z for z in down):
        raise ValueError('expected {"down": [zone names]}')
    return frozenset(down)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What one decision is made from: the live statuses, the down zones and the last
    decision with the ``mod_revision`` the write must compare (0: none yet)."""

    statuses: tuple[NodeStatus, ...]
    down_zones: frozenset[str]
    previous: dict[str, Any] | None
    mod_revision: int


class Coordinator:
    """Campaigns for coordinator, decides while leading, follows the decision always.

    Owns its tasks and its election lease (:meth:`start`, :meth:`aclose`); the etcd client
    is the caller's (closed by it after :meth:`aclose`). ``clock`` is wall time: decisions
    carry it (``at``), and a new leader reads the stabilisation window from the last one.
    """

    def __init__(
        self,
        settings: Settings,
        etcd: EtcdClient,
        observer: ClusterObserver = NO_METRICS,
        *,
        node_id: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        node_id = node_id or settings.node_id
        if not node_id:
            raise ValueError("a coordinator needs the node's id (node_id or settings.node_id)")
        self.node_id = node_id
        self.keys = ClusterKeys(settings.cluster)
        self.policy = policy_from_settings(settings)
        self.interval_s = settings.scale_interval_s
        self.lease_ttl_s = settings.lease_ttl_s
        self._etcd = etcd
        self._observer = observer
        self._clock = clock
        self._history: tuple[Recommendation, ...] = ()
        self._task: asyncio.Task[None] | None = None
        self._lease: Lease | None = None
        self._leading = asyncio.Event()
        self._warned: dict[str, int] = {}  # key -> mod_revision already logged as malformed
        self.decision: dict[str, Any] | None = None  # the last decision read from etcd

    @property
    def is_leader(self) -> bool:
        return self._leading.is_set()

    async def wait_leading(self) -> None:
        """Return once this node leads (it may lose the lead again later)."""
        await self._leading.wait()

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"coordinator:{self.node_id}"
            )

    async def aclose(self) -> None:
        """Stop campaigning and deciding; give up the lead at once (revoke the lease, so
        another node leads without waiting for a TTL)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # Bounded: a watch whose stream hangs in its own cancel must not hold up the
            # node's shutdown.
            done, _ = await asyncio.wait({task}, timeout=CLOSE_TIMEOUT_S)
            if not done:
                log.warning("coordinator %s: its tasks did not stop in time", self.node_id)
            elif not task.cancelled() and task.exception() is not None:
                log.warning("coordinator %s: ended with %r", self.node_id, task.exception())
        lease, self._lease = self._lease, None
        self._leading.clear()
        if lease is not None:
            with contextlib.suppress(Unavailable):
                await self._etcd.revoke_lease(lease)

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._follow_decisions(), name="coordinator:follow")
            group.create_task(self._campaign_forever(), name="coordinator:campaign")

    # -- election ------------------------------------------------------------------------

    async def _campaign_forever(self) -> None:
        while True:
            try:
                if await self._campaign():
                    await self._lead()
                else:
                    await self._wait_vacancy()
            except Unavailable as error:  # etcd unreachable, lease lost: campaign again
                log.warning("coordinator %s: %s", self.node_id, error)
                self._leading.clear()
                await asyncio.sleep(RETRY_S)

    async def _campaign(self) -> bool:
        """Try to become leader; whether this node now holds the coordinator key (under a
        fresh lease, kept alive while it leads; a loser revokes its own)."""
        lease = self._lease = await self._etcd.grant_lease(self.lease_ttl_s)
        value = json.dumps({"id": self.node_id, "lease": lease.id, "at": self._clock()})
        won = False
        try:
            won = await self._etcd.create(self.keys.coordinator, value.encode(), lease)
        finally:
            if not won:
                self._lease = None
                with contextlib.suppress(Unavailable):
                    await self._etcd.revoke_lease(lease)
        return won

    async def _wait_vacancy(self) -> None:
        """Return when the coordinator key is gone (its holder's lease ended)."""
        while True:
            held = await self._etcd.get(self.keys.coordinator)
            if held is None:
                return
            events = await self._etcd.watch_prefix(self.keys.coordinator, held[1] + 1)
            # Looked at again every TTL besides the watch: a watch event lost on the way
            # (a broken stream) must not leave the cluster without a coordinator.
            with contextlib.suppress(TimeoutError):
                async with _closing(events), asyncio.timeout(self.lease_ttl_s):
                    async for event in events:
                        if event.key == self.keys.coordinator and event.kind is EventKind.DELETE:
                            return
                    raise Unavailable("the watch on the coordinator key ended")

    async def _lead(self) -> None:
        assert self._lease is not None
        lease = self._lease
        log.info("coordinator %s: leading (lease %x)", self.node_id, lease.id)
        self._history = ()
        self._leading.set()
        failed: Unavailable | None = None
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._keep_alive(lease))
                group.create_task(self._decide_forever())
        except* Unavailable as errors:
            # The lease ended (or etcd stayed away for a TTL): no longer the leader.
            failed = errors.exceptions[0]  # type: ignore[assignment]
        finally:
            self._leading.clear()
        self._lease = None
        raise failed or Unavailable("the coordinator stopped leading")

    async def _keep_alive(self, lease: Lease) -> None:
        every = max(lease.ttl / 3, 0.1)
        last_ok = time.monotonic()
        while True:
            await asyncio.sleep(every)
            try:
                await self._etcd.refresh_lease(lease)
                last_ok = time.monotonic()
                self._observer.lease_renewal("ok")
            except LeaseLost:
                self._observer.lease_renewal("error")
                raise
            except Unavailable:
                self._observer.lease_renewal("error")
                if time.monotonic() - last_ok >= lease.ttl:  # it has expired in etcd by now
                    raise

    # -- deciding ------------------------------------------------------------------------

    async def _decide_forever(self) -> None:
        while True:
            try:
                await self.decide_once()
            except Unavailable as error:  # one round missed; the lease decides leadership
                log.warning("coordinator %s: no decision this round: %s", self.node_id, error)
            await asyncio.sleep(self.interval_s)

    async def decide_once(self, retries: int = 2) -> dict[str, Any] | None:
        """Read, decide and write one decision; the decision written, or None when every
        try lost its compare-and-swap to another writer (each loss re-reads)."""
        for _ in range(retries + 1):
            snapshot = await self.read_snapshot()
            written = await self.write_decision(snapshot, self.decide(snapshot))
            if written is not None:
                return written
        return None

    async def read_snapshot(self) -> Snapshot:
        items, _ = await self._etcd.get_prefix(self.keys.nodes)
        statuses: list[NodeStatus] = []
        for item in items:
            try:
                statuses.append(parse_status(_decode(item.value)))
            except ValueError as error:
                self._malformed(item.key, item.mod_revision, "node status", error)
        down: frozenset[str] = frozenset()
        failover = await self._etcd.get(self.keys.failover)
        if failover is not None:
            try:
                down = parse_failover(failover[0])
            except ValueError as error:
                self._malformed(self.keys.failover, failover[1], "zone failover", error)
        previous, revision = None, 0
        got = await self._etcd.get(self.keys.decision)
        if got is not None:
            revision = got[1]  # a malformed decision is still the one to replace
            try:
                previous = parse_decision(got[0])
            except ValueError as error:
                self._malformed(self.keys.decision, got[1], "decision", error)
        return Snapshot(tuple(statuses), down, previous, revision)

    def decide(self, snapshot: Snapshot) -> Decision:
        now = self._clock()
        if not self._history and snapshot.previous is not None:
            # A new leader continues the last leader's window from its last decision.
            previous = snapshot.previous
            recommended = previous.get("recommendation", previous["desired"])
            if isinstance(recommended, int) and not isinstance(recommended, bool):
                self._history = ((float(previous["at"]), recommended),)
        return desired_nodes(
            snapshot.statuses, self.policy, self._history, now, snapshot.down_zones
        )

    async def write_decision(self, snapshot: Snapshot, decision: Decision) -> dict[str, Any] | None:
        """Write ``decision`` if the last decision is still the one ``snapshot`` read;
        the JSON written, or None when another writer came first."""
        now = self._clock()
        record = {
            "desired": decision.desired,
            "current": decision.current,
            "reason": str(decision.reason),
            "recommendation": decision.recommendation,
            "signals": decision.signals_json(),
            "down_zones": sorted(snapshot.down_zones),
            "revision": snapshot.mod_revision,
            "by": self.node_id,
            "at": now,
        }
        value = json.dumps(record, separators=(",", ":")).encode()
        if not await self._etcd.compare_and_swap(self.keys.decision, value, snapshot.mod_revision):
            log.info(
                "coordinator %s: another decision replaced revision %d first; re-reading",
                self.node_id,
                snapshot.mod_revision,
            )
            return None
        self._history = remember(
            self._history, now, decision.recommendation, self.policy.scale_down_stabilization_s
        )
        self._observer.scaling_decision(decision.desired, str(decision.reason))
        return record

    # -- following -----------------------------------------------------------------------

    async def _follow_decisions(self) -> None:
        while True:
            try:
                got = await self._etcd.get(self.keys.decision)
                start = None
                if got is not None:
                    self._apply(got[0], got[1])
                    start = got[1] + 1
                events = await self._etcd.watch_prefix(self.keys.decision, start)
                async with _closing(events):
                    async for event in events:
                        if event.key == self.keys.decision and event.kind is EventKind.PUT:
                            self._apply(event.value, event.mod_revision)
            except WatchCompacted:
                continue  # read it again, then watch from there
            except Unavailable as error:
                log.warning("coordinator %s: following decisions: %s", self.node_id, error)
            await asyncio.sleep(RETRY_S)

    def _apply(self, value: bytes, revision: int) -> None:
        try:
            decision = parse_decision(value)
        except ValueError as error:
            self._malformed(self.keys.decision, revision, "decision", error)
            return
        self.decision = decision
        self._observer.desired_nodes(decision["desired"])

    def _malformed(self, key: str, revision: int, what: str, error: Exception) -> None:
        if self._warned.get(key) == revision:
            return  # logged once per revision, not every round
        if len(self._warned) > 10_000:
            self._warned.clear()
        self._warned[key] = revision
        log.warning("ignoring a malformed %s at %s (revision %d): %s", what, key, revision, error)
