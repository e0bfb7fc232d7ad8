"""KServe v2 Open Inference Protocol: REST routes and the ``inference.GRPCInferenceService``.

``codec``, ``rest_codec`` and ``rest`` are plain Python and numpy. ``grpc`` loads agentd's
generated ``inference`` protobuf package, which clashes with tritonclient's copy in one
process, so it is imported only when asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agentd.gateway.kserve.rest import OPEN_PATHS, KServeRest

if TYPE_CHECKING:
    from agentd.gateway.kserve.grpc import KServeGrpcApp, kserve_grpc_app

__all__ = ["OPEN_PATHS", "KServeGrpcApp", "KServeRest", "kserve_grpc_app"]


def __getattr__(name: str) -> Any:
    if name in ("KServeGrpcApp", "kserve_grpc_app"):
        from agentd.gateway.kserve import grpc

        return getattr(grpc, name)
    raise AttributeError(name)
