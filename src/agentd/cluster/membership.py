"""etcd membership of one node: its status under a lease, the cluster's view from a prefix
watch, partition ownership by compare-and-swap, hand-over by draining, and what the node
does when its lease may have lapsed (docs/cluster.md, "Many machines (etcd)").

Keys under ``/agentd/<cluster>/``:

- ``nodes/<id>``: the node's status (JSON, see :meth:`EtcdMembership.status`) under its
  lease, rewritten every ``status_interval_s``; gone when the lease expires.
- ``partitions/<p>``: the id of the partition's owner, under the owner's lease; taken
  with a create (absent) and handed over with a compare-and-swap on its mod revision.
- ``scale/zone/failover``: ``{"down": ["zone-a"]}``: nodes of these zones hand away
  every partition and claim none.

Every node watches the prefix and keeps its forwarder's placement and endpoints current;
bad data under the prefix is logged (at most once a minute per kind) and ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from agentd.cluster.etcd import (
    EtcdClient,
    EventKind,
    Lease,
    LeaseLost,
    WatchCompacted,
    WatchEvent,
)
from agentd.cluster.ownership import UNOWNED, OwnershipGate, plan_for, plan_owners
from agentd.cluster.placement import Placement, partition_of
from agentd.errors import Unavailable
from agentd.observability.cluster_metrics import NO_METRICS, ClusterObserver
from agentd.runtime.host import ActorHost
from agentd.settings import Settings

__all__ = ["EtcdMembership", "NodeInfo", "cluster_prefix"]

_log = logging.getLogger(__name__)

STATUS_VERSION = 1
MAX_NODE_ID = 200
# How long held calls wait for the new owner's key to be seen before they route again.
HANDOVER_SETTLE_S = 1.0
RELEASE_TIMEOUT_S = 10.0
RETRY_S = 0.5  # etcd unreachable: the pause before the next try
CLAIM_BATCH = 64  # concurrent transactions of one claim round
CONNECT_TIMEOUT_S = 10.0  # a node starting with etcd waits this long for it to answer


def cluster_prefix(cluster: str) -> str:
    return f"/agentd/{cluster}/"


@dataclass(frozen=True, slots=True)
class NodeInfo:
    id: str
    peer: str
    zone: str
    lease: int


class _RateLimitedLog:
    """One warning per kind per ``every`` seconds (bad etcd data may repeat forever)."""

    def __init__(self, every: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self._every = every
        self._clock = clock
        self._last: dict[str, float] = {}

    def warning(self, kind: str, message: str, *args: object) -> None:
        now = self._clock()
        if now - self._last.get(kind, -math.inf) >= self._every:
            self._last[kind] = now
            _log.warning(message, *args)


def parse_node(key_id: str, value: bytes) -> NodeInfo:
    """A node's status as written under ``nodes/<key_id>``; ValueError if malformed."""
    data = json.loads(value)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    node_id, peer, zone, lease = (
        data.get("id"),
        data.get("peer"),
        data.get("zone"),
        data.get("lease"),
    )
    if node_id != key_id:
        raise ValueError(f"id {node_id!r} is not the key's {key_id!r}")
    if not isinstance(peer, str) or not peer:
        raise ValueError(f"peer must be a non-empty string, not {peer!r}")
    if not isinstance(zone, str) or not zone:
        raise ValueError(f"zone must be a non-empty string, not {zone!r}")
    if isinstance(lease, bool) or not isinstance(lease, int) or lease <= 0:
        raise ValueError(f"lease must be a positive integer, not {lease!r}")
    return NodeInfo(node_id, peer, zone, lease)


def parse_down_zones(value: bytes) -> frozenset[str]:
    data = json.loads(value)
    down = data.get("down") if isinstance(data, dict) else None
    if not isinstance(down, list) or not all(isinstance(z, str) for z in down):
        raise ValueError('expected {"down": ["zone", ...]}')
    return frozenset(down)


class _QueueProbe:
    """A no-op job put on the node's run queue once per status: the time it waits for a
    worker is the time a turn waits now (the status's ``queue_time_s``), measured without
    adding anything to the turn path."""

    __slots__ = ("_clock", "submitted", "waited")

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.submitted = clock()
        self.waited: float | None = None  # None while queued

    async def run(self) -> None:
        self.waited = self._clock() - self.submitted


class EtcdMembership:
    """One node's membership of an etcd cluster.

    Owns its etcd client, its lease, three background tasks (lease keep-alive and status,
    prefix watch, rebalancing) and the :class:`OwnershipGate` it puts in front of the
    node's forwarder (``host.forwarder``). :meth:`start` registers the node and claims
    its share before returning (Unavailable when etcd does not answer); :meth:`aclose`
    releases the node's agents, revokes its lease (its partitions go to the others at
    once) and closes the client.
    """

    def __init__(
        self,
        settings: Settings,
        forwarder: Any,
        host: ActorHost,
        observer: ClusterObserver = NO_METRICS,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not settings.etcd:
            raise ValueError("etcd membership needs settings.etcd")
        self.node_id: str = getattr(forwarder, "node_id", None) or settings.node_id or ""
        if not self.node_id or len(self.node_id) > MAX_NODE_ID or "/" in self.node_id:
            raise ValueError(f"a node id must be 1..{MAX_NODE_ID} characters without '/'")
        self.settings = settings
        self.prefix = cluster_prefix(settings.cluster)
        self._ttl = settings.lease_ttl_s
        # Renew often enough that two missed renewals still leave the lease alive.
        self._interval = min(settings.status_interval_s, self._ttl / 3)
        # The lease counts from etcd's receipt of a renewal, which is after we sent it;
        # a margin for clock rates keeps us from serving past the lease's end.
        self._margin = min(0.5, self._ttl / 10)
        self._etcd = EtcdClient(settings.etcd, timeout=max(0.5, min(2.0, self._ttl / 3)))
        self._forwarder = forwarder
        self._host = host
        self._observer = observer
        self._clock = clock
        self._partitions = settings.partitions
        self.gate = OwnershipGate(
            forwarder, host, node_id=self.node_id, partitions=self._partitions, clock=clock
        )
        self.owners: list[str] = [UNOWNED] * self._partitions
        self._revisions: list[int] = [0] * self._partitions
        self.nodes: dict[str, NodeInfo] = {}
        self.down_zones: frozenset[str] = frozenset()
        self.revision = 0
        self.lease: Lease | None = None
        self._renewed_at = -math.inf
        self._fence_timer: asyncio.TimerHandle | None = None
        # The owner of each partition as etcd last said (the view may be ahead of it:
        # a claim or hand-over is entered at once, the watch confirms it).
        self._seen: list[str] = [UNOWNED] * self._partitions
        self._seen_changed = asyncio.Event()
        self._fenced_released = False  # the agents were released after a fence
        self._moving: set[int] = set()
        self._wake = asyncio.Event()
        self._push_pending = False
        self._tasks: list[asyncio.Task[None]] = []
        self._chores: set[asyncio.Task[Any]] = set()
        self._bad = _RateLimitedLog()
        self._started_at = time.time()
        self._peer = ""
        self._desired_for: frozenset[str] | None = None
        self._desired: list[str] = []
        self._probe: _QueueProbe | None = None
        self._queue_time = 0.0  # a moving average of the probes' waits
        self._tokens: tuple[float, float] | None = None  # (when, tokens generated) last read
        self._tokens_per_s = 0.0

    # -- life ---------------------------------------------------------------------------

    @property
    def peer(self) -> str:
        return self._peer

    async def start(self) -> None:
        local = getattr(self._forwarder, "local_endpoint", None)
        advertise = self.settings.advertise
        self._peer = local or (f"tcp:{advertise}" if advertise else "")
        if not self._peer:
            raise ValueError("etcd membership needs the node's peer endpoint")
        await self._etcd.connect(timeout=CONNECT_TIMEOUT_S)
        self._host.forwarder = self.gate
        await self._register()
        items, revision = await self._etcd.get_prefix(self.prefix)
        self._load(items, revision)
        await self._adopt()
        self._push()
        await self._rebalance_once()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._keep_alive(), name=f"etcd-lease-{self.node_id}"),
            loop.create_task(self._watch(), name=f"etcd-watch-{self.node_id}"),
            loop.create_task(self._rebalance(), name=f"etcd-rebalance-{self.node_id}"),
        ]

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        if self._fence_timer is not None:
            self._fence_timer.cancel()
        # Hand the agents away (their last states flushed), then let the lease go: the
        # other nodes see the keys vanish and claim the partitions at once.
        self.gate.fence()
        with contextlib.suppress(Exception):
            await self._host.release(lambda address: False, timeout=RELEASE_TIMEOUT_S)
        for chore in list(self._chores):
            chore.cancel()
        if self._chores:
            await asyncio.wait(self._chores)
        if self.lease is not None:
            with contextlib.suppress(Unavailable):
                await self._etcd.revoke_lease(self.lease)
        await self.gate.aclose()
        await self._etcd.aclose()

    # -- status and lease ---------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """This node's status, as written under ``nodes/<id>``."""
        host = self._host
        pool = host.pool.statistics()
        used = total = tokens = 0.0
        generation = getattr(host, "generation", None)
        if generation is not None:
            with contextlib.suppress(Exception):
                for gauges in generation.gauges().values():
                    used += gauges.get("blocks_used", 0)
                    total += gauges.get("blocks_used", 0) + gauges.get("blocks_free", 0)
                    tokens += gauges.get("tokens_generated", 0)
        return {
            "id": self.node_id,
            "peer": self._peer,
            "zone": self.settings.zone,
            "load": pool.busy / pool.num_workers if pool.num_workers else 0.0,
            "run_queue": pool.queued,
            "active_agents": host.gauges()["active_agents"],
            "tokens_per_s": round(self._token_rate(tokens), 3),
            "kv_blocks_used": int(used),
            "kv_blocks_total": int(total),
            "queue_time_s": round(self._queue_time_s(), 6),
            "partitions": sum(1 for owner in self.owners if owner == self.node_id),
            "lease": self.lease.id if self.lease is not None else 0,
            "started_at": self._started_at,
            "version": STATUS_VERSION,
        }

    def _token_rate(self, tokens: float) -> float:
        """Tokens generated per second since the last status (0 until two readings)."""
        now = self._clock()
        last, self._tokens = self._tokens, (now, tokens)
        if last is not None and now > last[0] and tokens >= last[1]:
            self._tokens_per_s = (tokens - last[1]) / (now - last[0])
        return self._tokens_per_s

    def _queue_time_s(self) -> float:
        """How long a job waits on the run queue for a worker now: the probes' waits,
        averaged; while a probe still waits, at least its wait so far. Sends the next."""
        probe = self._probe
        if probe is not None:
            if probe.waited is None:
                return max(self._queue_time, self._clock() - probe.submitted)
            self._queue_time = 0.5 * self._queue_time + 0.5 * probe.waited
        self._probe = _QueueProbe(self._clock)
        try:
            # Past the queue's bound (one tiny job): a full queue is when it matters.
            self._host.pool.requeue(self._probe)
        except Exception:  # a pool that takes no job: no probe, no figure
            self._probe = None
        return self._queue_time

    def _node_key(self) -> str:
        return f"{self.prefix}nodes/{self.node_id}"

    async def _register(self) -> None:
        """A new lease and the status under it; the node may serve again."""
        sent = self._clock()
        lease = await self._etcd.grant_lease(self._ttl)
        self.lease = lease
        await self._etcd.put(self._node_key(), self._status_bytes(), lease=lease)
        self._renewed(sent)
        self._unfence()
        _log.info("node %s joined etcd (lease %x, ttl %ss)", self.node_id, lease.id, lease.ttl)

    def _status_bytes(self) -> bytes:
        return json.dumps(self.status(), separators=(",", ":")).encode()

    def _renewed(self, sent: float) -> None:
        """A renewal sent at ``sent`` succeeded: the lease lasts at least TTL from then."""
        self._renewed_at = sent
        valid_until = sent + self._ttl - self._margin
        self.gate.valid_until = valid_until
        loop = asyncio.get_running_loop()
        if self._fence_timer is not None:
            self._fence_timer.cancel()
        # A plain callback (not a task): after a stall it runs in the first loop
        # iteration, before any turn that new input could start.
        delay = max(0.0, valid_until - self._clock())
        self._fence_timer = loop.call_at(loop.time() + delay, self._lease_may_have_lapsed)

    def lease_age(self) -> float:
        """Seconds since the last renewal that etcd confirmed was sent."""
        return self._clock() - self._renewed_at

    def _lease_may_have_lapsed(self) -> None:
        left = self.gate.valid_until - self._clock()
        if left > 0:
            # Early: uvloop's timers have millisecond resolution. Look again then (a
            # renewal meanwhile replaces this timer).
            loop = asyncio.get_running_loop()
            self._fence_timer = loop.call_at(
                loop.time() + max(left, 0.001), self._lease_may_have_lapsed
            )
            return
        if not self.gate.fenced or not self._fenced_released:
            _log.warning(
                "node %s: no lease renewal for %.1fs (ttl %ss): it stops serving its "
                "partitions until etcd answers",
                self.node_id,
                self.lease_age(),
                self._ttl,
            )
        self._fence()

    def _fence(self) -> None:
        self.gate.fence()
        if not self._fenced_released:
            self._fenced_released = True
            # At once, not in a task: after a stall this runs before any turn that input
            # arriving with the wake could start; waiting callers get UNAVAILABLE.
            self._host.release_nowait(
                lambda address: False,
                Unavailable(f"node {self.node_id} may have lost its etcd lease; retry"),
            )

    def _unfence(self) -> None:
        self._fenced_released = False
        self.gate.unfence()

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            sent = self._clock()
            try:
                if self.lease is None:
                    await self._register()
                    self._wake.set()
                    continue
                await self._etcd.refresh_lease(self.lease)
                self._renewed(sent)
                self._observer.lease_renewal("ok")
                if self.gate.fenced:
                    _log.info("node %s: etcd answers again; its lease held", self.node_id)
                    self._unfence()
                    self._wake.set()
                await self._etcd.put(self._node_key(), self._status_bytes(), lease=self.lease)
            except LeaseLost:
                self._observer.lease_renewal("error")
                self._lease_lost()
            except Unavailable as error:
                self._observer.lease_renewal("error")
                self._bad.warning("renew", "node %s: lease renewal failed: %s", self.node_id, error)

    def _lease_lost(self) -> None:
        """etcd says the lease is gone: so are this node's keys."""
        _log.warning("node %s: its etcd lease expired; it registers again", self.node_id)
        self.lease = None
        self.gate.valid_until = -math.inf
        self._fence()
        mine = [p for p, owner in enumerate(self.owners) if owner == self.node_id]
        for p in mine:
            self.owners[p] = UNOWNED
            self._revisions[p] = 0
        if mine:
            self._observer.partitions_moved("out", len(mine))
        self._push()

    # -- the view -----------------------------------------------------------------------

    def _load(self, items: Iterable[Any], revision: int) -> None:
        """Replace the view with a full listing at ``revision``."""
        mine_before = self._mine()
        self.owners = [UNOWNED] * self._partitions
        self._revisions = [0] * self._partitions
        self._seen = [UNOWNED] * self._partitions
        self.nodes = {}
        self.down_zones = frozenset()
        for kv in items:
            self._apply(WatchEvent(EventKind.PUT, kv.key, kv.value, kv.mod_revision))
        self.revision = revision
        self._lost(mine_before - self._mine())

    def _mine(self) -> set[int]:
        me = self.node_id
        return {p for p, owner in enumerate(self.owners) if owner == me}

    def _apply(self, event: WatchEvent) -> None:
        """One change under the prefix into the view; bad data is logged and ignored."""
        if not event.key.startswith(self.prefix):
            return
        name = event.key[len(self.prefix) :]
        kind, _, rest = name.partition("/")
        try:
            if kind == "nodes":
                self._apply_node(rest, event)
            elif kind == "partitions":
                self._apply_partition(rest, event)
            elif name == "scale/zone/failover":
                self.down_zones = (
                    frozenset() if event.kind is EventKind.DELETE else parse_down_zones(event.value)
                )
        except ValueError as error:  # json errors are ValueErrors too
            self._bad.warning(
                kind, "ignored bad etcd data at %s: %s", event.key[:200], str(error)[:200]
            )

    def _apply_node(self, node_id: str, event: WatchEvent) -> None:
        if event.kind is EventKind.DELETE:
            self.nodes.pop(node_id, None)
            return
        self.nodes[node_id] = parse_node(node_id, event.value)

    def _apply_partition(self, text: str, event: WatchEvent) -> None:
        if not text.isdigit() or not 0 <= int(text) < self._partitions:
            raise ValueError(f"no partition {text[:20]!r} (partitions 0..{self._partitions - 1})")
        p = int(text)
        was = self.owners[p]
        if event.kind is EventKind.DELETE:
            owner, revision = UNOWNED, 0
        else:
            owner = event.value.decode(errors="replace")
            if not owner or len(owner) > MAX_NODE_ID:
                raise ValueError(f"owner {owner[:40]!r} is not a node id")
            revision = event.mod_revision
        self.owners[p], self._revisions[p] = owner, revision
        self._seen[p] = owner
        self._seen_changed.set()
        if was == self.node_id and owner != self.node_id and p not in self._moving:
            self._lost([p])

    def _lost(self, partitions: Iterable[int]) -> None:
        """Partitions this node owned and no longer does (not by its own hand-over): its
        agents there are released."""
        lost = set(partitions)
        if not lost:
            return
        self._observer.partitions_moved("out", len(lost))
        _log.warning("node %s lost %d partitions", self.node_id, len(lost))
        parts = self._partitions
        self._chore(
            self._host.release(
                lambda address: partition_of(address, parts) not in lost, timeout=RELEASE_TIMEOUT_S
            )
        )

    def _changed(self) -> None:
        """Push the view to the forwarder once per loop iteration; wake the rebalancer."""
        self._wake.set()
        if not self._push_pending:
            self._push_pending = True
            asyncio.get_running_loop().call_soon(self._push)

    def _push(self) -> None:
        self._push_pending = False
        endpoints = {node.id: node.peer for node in self.nodes.values()}
        endpoints[self.node_id] = self._peer
        placement = Placement(self.owners, self.revision, unowned=True)
        self._forwarder.update(placement=placement, endpoints=endpoints)
        self._observer.partitions_owned(len(self._mine()))

    async def _watch(self) -> None:
        while True:
            try:
                watch = await self._etcd.watch_prefix(self.prefix, self.revision + 1)
                async for event in watch:
                    self._apply(event)
                    self.revision = max(self.revision, event.mod_revision)
                    self._changed()
                return  # the client closed
            except (Unavailable, WatchCompacted) as error:
                self._bad.warning("watch", "node %s: etcd watch: %s", self.node_id, error)
            # Missed changes: list again, then watch from the listing.
            while True:
                await asyncio.sleep(RETRY_S)
                try:
                    items, revision = await self._etcd.get_prefix(self.prefix)
                except Unavailable:
                    continue
                self._load(items, revision)
                self._changed()
                break

    # -- ownership ----------------------------------------------------------------------

    def desired(self) -> list[str]:
        """The plan for the eligible nodes (live, zone not down; this node counts once its
        lease is held)."""
        eligible = {n.id for n in self.nodes.values() if n.zone not in self.down_zones}
        eligible.discard(self.node_id)
        if self.lease is not None and self.settings.zone not in self.down_zones:
            eligible.add(self.node_id)
        key = frozenset(eligible)
        if key != self._desired_for:
            self._desired_for = key
            self._desired = plan_owners(self._partitions, key)
        return self._desired

    async def _rebalance(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self._rebalance_once()
            except Unavailable as error:
                self._bad.warning("rebalance", "node %s: rebalancing: %s", self.node_id, error)
                await asyncio.sleep(RETRY_S)

    async def _rebalance_once(self) -> None:
        if self.lease is None or self.gate.fenced:
            return  # takes no partitions while it cannot be sure of its lease
        plan = plan_for(self.node_id, self.owners, self.desired())
        if plan.claim:
            await self._claim([p for p in plan.claim if p not in self._moving])
        for receiver, partitions in plan.hand_over.items():
            node = self.nodes.get(receiver)
            ready = [p for p in partitions if p not in self._moving and self._revisions[p]]
            if node is not None and ready:
                await self._hand_over(node, ready)

    async def _claim(self, partitions: list[int]) -> None:
        lease = self.lease
        if lease is None or not partitions:
            return
        me = self.node_id.encode()
        taken: list[int] = []
        for start in range(0, len(partitions), CLAIM_BATCH):
            batch = partitions[start : start + CLAIM_BATCH]
            results = await asyncio.gather(
                *(self._etcd.create(self._partition_key(p), me, lease=lease) for p in batch)
            )
            taken.extend(p for p, ok in zip(batch, results, strict=True) if ok)
        if taken:
            for p in taken:
                if self.owners[p] == UNOWNED:
                    self.owners[p] = self.node_id  # the watch brings the revision
            self._observer.partitions_moved("in", len(taken))
            self._push()

    def _partition_key(self, p: int) -> str:
        return f"{self.prefix}partitions/{p}"

    async def _adopt(self) -> None:
        """After a restart with the same id within the old lease: keep the partitions
        still held under the old lease by moving them to the new one."""
        lease = self.lease
        if lease is None:
            return
        me = self.node_id.encode()
        for p in sorted(self._mine()):
            if await self._etcd.compare_and_swap(
                self._partition_key(p), me, self._revisions[p], lease=lease
            ):
                revision = await self._etcd.get(self._partition_key(p))
                if revision is not None:
                    self._revisions[p] = revision[1]

    async def _hand_over(self, node: NodeInfo, partitions: list[int]) -> None:
        """Drain ``partitions`` and give them to ``node``: hold new calls, let running
        and queued turns finish, passivate and flush, then move the keys (CAS); held
        calls then go to the new owner."""
        moving = set(partitions)
        self._moving |= moving
        self.gate.hold(moving)
        moved: list[int] = []
        try:
            parts = self._partitions
            await self._host.release(
                lambda address: partition_of(address, parts) not in moving,
                timeout=RELEASE_TIMEOUT_S,
            )
            receiver = node.id.encode()
            for start in range(0, len(partitions), CLAIM_BATCH):
                batch = partitions[start : start + CLAIM_BATCH]
                results = await asyncio.gather(
                    *(
                        self._etcd.compare_and_swap(
                            self._partition_key(p), receiver, self._revisions[p], lease=node.lease
                        )
                        for p in batch
                    ),
                    return_exceptions=True,
                )
                for p, ok in zip(batch, results, strict=True):
                    if ok is True:
                        moved.append(p)
                        self.owners[p] = node.id
                    elif isinstance(ok, BaseException) and not isinstance(ok, Unavailable):
                        raise ok
            if moved:
                self._observer.partitions_moved("out", len(moved))
                self._push()
                _log.info("node %s handed %d partitions to %s", self.node_id, len(moved), node.id)
                await self._settle(node.id, moved)
        finally:
            self._moving -= moving
            self.gate.unhold(moving)

    async def _settle(self, receiver: str, partitions: list[int]) -> None:
        """Wait (briefly) until the watch has brought the moved keys: the receiver sees
        them at about the same time, so held calls do not bounce back to us."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(HANDOVER_SETTLE_S):
                while any(self._seen[p] != receiver for p in partitions):
                    self._seen_changed.clear()
                    await self._seen_changed.wait()

    def _chore(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._chores.add(task)
        task.add_done_callback(self._chore_done)

    def _chore_done(self, task: asyncio.Task[Any]) -> None:
        self._chores.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _log.warning("node %s: %s", self.node_id, task.exception())
