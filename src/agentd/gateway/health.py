"""``grpc.health.v1.Health`` (Check and Watch) over the serving state of the node."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from connectrpc.code import Code as ConnectCode
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from connectrpc.server import Endpoint
from grpc_health.v1 import health_pb2

from agentd.gateway.services import ServiceApp, method

__all__ = ["HealthState", "health_app"]

SERVICE = "grpc.health.v1.Health"
Status = health_pb2.HealthCheckResponse.ServingStatus


class HealthState:
    """Serving status per service name ("" is the whole node); watchers see changes.

    Readiness checks (``add_check``) are asked on each probe of the whole node (``/readyz``
    and Check of ""): a failing one makes the node not ready, with its reason.
    """

    def __init__(self, services: list[str]) -> None:
        self._status: dict[str, int] = {name: Status.NOT_SERVING for name in ["", *services]}
        self._changed = asyncio.Event()
        self._checks: list[Callable[[], str | None]] = []

    def add_check(self, check: Callable[[], str | None]) -> None:
        """``check()`` returns why the node is not ready (e.g. its state store is failing),
        or None; it runs on every readiness probe, so it must be cheap."""
        self._checks.append(check)

    def not_ready_reason(self) -> str | None:
        """Why the whole node is not ready, or None when it is."""
        if self._status[""] != Status.SERVING:
            return "not serving (starting or stopping)"
        for check in self._checks:
            reason = check()
            if reason is not None:
                return reason
        return None

    def set_all(self, status: int) -> None:
        for name in self._status:
            self._status[name] = status
        # Wake every watcher, then arm a fresh event for the next change.
        self._changed.set()
        self._changed = asyncio.Event()

    @property
    def serving(self) -> bool:
        return self.not_ready_reason() is None

    def get(self, service: str) -> int | None:
        return self._status.get(service)

    async def check(
        self, request: health_pb2.HealthCheckRequest, ctx: RequestContext
    ) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            raise ConnectError(ConnectCode.NOT_FOUND, f"unknown service {request.service!r}")
        if request.service == "" and status == Status.SERVING and not self.serving:
            status = Status.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)

    async def watch(
        self, request: health_pb2.HealthCheckRequest, ctx: RequestContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last = None
        while True:
            changed = self._changed
            status = self._status.get(request.service, Status.SERVICE_UNKNOWN)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await changed.wait()


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
