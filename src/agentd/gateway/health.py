"""The node's one readiness, and ``grpc.health.v1.Health`` (Check and Watch) over it.

Every readiness answer of the node comes from :class:`HealthState`: ``/readyz``, KServe's
``/v2/health/ready`` and gRPC ``ServerReady``, and gRPC health ``Check`` / ``Watch`` of
the node (``""``) and of each service it serves. So they cannot disagree while the node
starts, drains or stops.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Callable

from connectrpc.code import Code as ConnectCode
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from connectrpc.server import Endpoint
from grpc_health.v1 import health_pb2

from agentd.gateway.services import ServiceApp, method

__all__ = ["HealthState", "Phase", "health_app"]

SERVICE = "grpc.health.v1.Health"
Status = health_pb2.HealthCheckResponse.ServingStatus

# Watchers look at the readiness checks this often (the checks are asked, not signalled:
# a state store that starts or stops failing says so only when asked).
_RECHECK_S = 1.0


class Phase(enum.Enum):
    """Where the node is in its life; only SERVING can be ready."""

    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"  # finishing in-flight calls before it stops; takes no new work
    STOPPED = "stopped"


_NOT_READY = {
    Phase.STARTING: "starting",
    Phase.DRAINING: "draining (finishing in-flight calls before it stops)",
    Phase.STOPPED: "stopped",
}


class HealthState:
    """The node's readiness: its phase, then its readiness checks (``add_check``), asked
    on each probe. Watchers are told when the phase changes."""

    def __init__(self, services: list[str]) -> None:
        self._services = frozenset(["", *services])
        self._phase = Phase.STARTING
        self._changed = asyncio.Event()
        self._checks: list[Callable[[], str | None]] = []

    def add_check(self, check: Callable[[], str | None]) -> None:
        """``check()`` returns why the node is not ready (e.g. its state store is failing),
        or None; it runs on every readiness probe, so it must be cheap."""
        self._checks.append(check)

    @property
    def phase(self) -> Phase:
        return self._phase

    def set_phase(self, phase: Phase) -> None:
        """Move to ``phase`` (a node that stopped stays stopped) and wake every watcher."""
        if self._phase is Phase.STOPPED or phase is self._phase:
            return
        self._phase = phase
        # Wake every watcher, then arm a fresh event for the next change.
        self._changed.set()
        self._changed = asyncio.Event()

    def not_ready_reason(self) -> str | None:
        """Why the node is not ready, or None when it is."""
        reason = _NOT_READY.get(self._phase)
        if reason is not None:
            return reason
        for check in self._checks:
            reason = check()
            if reason is not None:
                return reason
        return None

    def ready(self) -> bool:
        return self.not_ready_reason() is None

    @property
    def serving(self) -> bool:
        return self.ready()

    def get(self, service: str) -> int | None:
        """The gRPC serving status of ``service`` ("" is the node), None if unknown. Every
        service of the node serves exactly when the node is ready."""
        if service not in self._services:
            return None
        return Status.SERVING if self.ready() else Status.NOT_SERVING

    async def check(
        self, request: health_pb2.HealthCheckRequest, ctx: RequestContext
    ) -> health_pb2.HealthCheckResponse:
        status = self.get(request.service)
        if status is None:
            raise ConnectError(ConnectCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def watch(
        self, request: health_pb2.HealthCheckRequest, ctx: RequestContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last = None
        while True:
            changed = self._changed
            status = self.get(request.service)
            if status is None:
                status = Status.SERVICE_UNKNOWN
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            try:
                async with asyncio.timeout(_RECHECK_S):
                    await changed.wait()
            except TimeoutError:
                pass


def health_app(state: HealthState) -> ServiceApp:
    req, res = health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
    return ServiceApp(
        f"/{SERVICE}",
        {
            f"/{SERVICE}/Check": Endpoint.unary(
                method=method(SERVICE, "Check", req, res), function=state.check
            ),
            f"/{SERVICE}/Watch": Endpoint.server_stream(
                method=method(SERVICE, "Watch", req, res), function=state.watch
            ),
        },
        read_max_bytes=64 * 1024,
    )
