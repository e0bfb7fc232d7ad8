"""Build a connect-python ASGI app for a service without generated connect code.

Used for the standard gRPC services (health, reflection) whose message classes come from
the grpcio-health-checking and grpcio-reflection packages.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

# The union of the four endpoint kinds that ConnectASGIApplication takes (connectrpc.server
# exports only their common base class).
from connectrpc._server_async import Endpoint
from connectrpc._server_shared import EndpointBidiStream, EndpointClientStream
from connectrpc.method import IdempotencyLevel, MethodInfo
from connectrpc.server import ConnectASGIApplication

from agentd.gateway.rpc_errors import compressions

__all__ = ["ServiceApp", "method"]


def method(service: str, name: str, request: type, response: type) -> MethodInfo:
    return MethodInfo(
        name=name,
        service_name=service,
        input=request,
        output=response,
        idempotency_level=IdempotencyLevel.UNKNOWN,
    )


class ServiceApp(ConnectASGIApplication[Any]):
    """A connect ASGI app over a fixed ``{path: Endpoint}`` table."""

    def __init__(
        self, path: str, endpoints: Mapping[str, Endpoint], *, read_max_bytes: int | None = None
    ) -> None:
        build: Callable[[Any], Mapping[str, Endpoint]] = lambda _svc: endpoints  # noqa: E731
        super().__init__(
            service=object(),
            endpoints=build,
            read_max_bytes=read_max_bytes,
            compressions=compressions(read_max_bytes or 64 * 1024 * 1024),
        )
        self._path = path
        self.method_paths = tuple(endpoints)
        # Paths whose method takes a stream of requests (the rest take exactly one).
        self.streaming_requests = frozenset(
            path
            for path, endpoint in endpoints.items()
            if isinstance(endpoint, EndpointClientStream | EndpointBidiStream)
        )

    @property
    def path(self) -> str:
        return self._path
