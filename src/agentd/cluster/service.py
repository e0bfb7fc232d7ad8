"""The cluster service of one node: its forwarder (given to the actor host), its peer
server, and in a multi-machine cluster its etcd membership and its coordinator candidate
(docs/cluster.md).

Static mode (``settings.peers``, set by the ``--processes N`` supervisor for its
children): every node's id and endpoint are given as ``id=endpoint``, partitions are dealt
to the ids in the order given, and this node (``settings.node_id``) listens on
``settings.peer_listen``. etcd mode (``settings.etcd``): membership in etcd keeps the
forwarder's placement and endpoints current; the node listens on ``settings.advertise``
(``HOST:PORT``) or a free loopback port.
"""

from __future__ import annotations

import socket
from typing import Any

from agentd.cluster.forwarder import ClusterForwarder
from agentd.cluster.peer import PeerServer, parse_endpoint
from agentd.cluster.placement import Placement
from agentd.errors import ConfigError
from agentd.observability.cluster_metrics import NO_METRICS, ClusterObserver
from agentd.settings import Settings

__all__ = ["ClusterService", "parse_peers"]


def parse_peers(peers: list[str]) -> dict[str, str]:
    """``["a=unix:/p", "b=tcp:h:1"]`` as ``{"a": "unix:/p", ...}`` in the order given;
    ConfigError for a malformed entry or a repeated id."""
    result: dict[str, str] = {}
    for entry in peers:
        node, sep, endpoint = entry.partition("=")
        node = node.strip()
        if not sep or not node:
            raise ConfigError(f"peer {entry[:200]!r} is not id=endpoint")
        if node in result:
            raise ConfigError(f"peer id {node!r} is given twice")
        parse_endpoint(endpoint.strip())
        result[node] = endpoint.strip()
    return result


class ClusterService:
    """Built by the node when ``settings.peers`` or ``settings.etcd`` is set.
    :attr:`forwarder` exists from the start (the actor host is built with it);
    :meth:`attach` gives it the host, :meth:`start` starts listening (and joins etcd)."""

    def __init__(
        self, settings: Settings, observer: ClusterObserver = NO_METRICS, *, tracer: Any = None
    ) -> None:
        self.settings = settings
        self.observer = observer
        self.tracer = tracer
        self.membership: Any = None
        self.coordinator: Any = None
        self._coordinator_etcd: Any = None
        if settings.peers:
            endpoints = parse_peers(settings.peers)
            node_id = settings.node_id
            if node_id is None or node_id not in endpoints:
                raise ConfigError(
                    f"node_id {node_id!r} is not one of the peers ({', '.join(endpoints)})"
                )
            self.listen = settings.peer_listen or endpoints[node_id]
            placement = Placement.spread(list(endpoints), settings.partitions)
            self.node_id = node_id
            self.forwarder = ClusterForwarder(node_id, placement, endpoints, observer)
        elif settings.etcd:
            self.node_id = settings.node_id or f"{socket.gethostname()}-{settings.port}"
            self.listen = f"tcp:{settings.advertise}" if settings.advertise else "tcp:127.0.0.1:0"
            parse_endpoint(self.listen)
            self.forwarder = ClusterForwarder(self.node_id, None, {}, observer)
        else:
            raise ConfigError("a cluster service needs peers or an etcd URL")
        observer.node(self.node_id)
        self.server: PeerServer | None = None
        self.host: Any = None

    @property
    def endpoint(self) -> str:
        """Where other nodes reach this one (the bound port once started)."""
        return self.server.endpoint if self.server is not None else self.listen

    def attach(self, host: Any) -> None:
        """The actor host this node serves to the others."""
        self.host = host
        self.server = PeerServer(host, self.listen, name=self.node_id, tracer=self.tracer)

    async def start(self) -> None:
        if self.server is None:
            raise RuntimeError("attach the host before starting the cluster service")
        await self.server.start()
        self.forwarder.local_endpoint = self.server.endpoint
        if self.settings.etcd:
            await self._join_etcd()

    async def _join_etcd(self) -> None:
        """Register, take partitions, and stand as coordinator candidate (every node does;
        etcd elects one). Imported here: aetcd is the optional cluster extra."""
        from agentd.cluster.coordinator import Coordinator
        from agentd.cluster.etcd import EtcdClient
        from agentd.cluster.membership import EtcdMembership

        settings = self.settings
        assert settings.etcd is not None
        self.membership = EtcdMembership(settings, self.forwarder, self.host, self.observer)
        await self.membership.start()
        # Its own connection: the coordinator's watch and writes never wait behind the
        # membership's lease renewals.
        self._coordinator_etcd = EtcdClient(settings.etcd, timeout=2.0)
        await self._coordinator_etcd.connect(timeout=10.0)
        self.coordinator = Coordinator(
            settings, self._coordinator_etcd, self.observer, node_id=self.node_id
        )
        await self.coordinator.start()

    async def aclose(self) -> None:
        """Leave etcd, stop accepting (calls in progress get UNAVAILABLE), close clients."""
        try:
            if self.coordinator is not None:
                await self.coordinator.aclose()  # revokes its lease: another leads at once
            if self._coordinator_etcd is not None:
                await self._coordinator_etcd.aclose()
            if self.membership is not None:
                await self.membership.aclose()
        finally:
            if self.server is not None:
                await self.server.aclose()
            await self.forwarder.aclose()
