"""KServe v2 gRPC: ``inference.GRPCInferenceService`` served by connect-python.

Converts ``ModelInferRequest`` tensors (``raw_input_contents`` or typed ``contents``) to numpy
with the codecs, calls the inference service, and answers with ``raw_output_contents`` (the
form tritonclient reads). Imports agentd's generated ``inference`` protobuf module, which must
stay out of any process that also loads tritonclient's copy of the same package.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Container
from typing import TYPE_CHECKING

import numpy as np
from connectrpc.code import Code as ConnectCode
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

from agentd.errors import AgentdError, InvalidArgument
from agentd.gateway.kserve.codec import datatype_of, decode_contents, decode_raw, encode_raw
from agentd.gateway.rpc_errors import call_timeout, compressions, to_connect_error
from agentd.inference.types import InferenceRequest, InferenceResponse, ModelMetadata
from agentd.kserve.v2 import grpc_service_pb2 as pb
from agentd.kserve.v2.grpc_service_connect import GRPCInferenceServiceASGIApplication

if TYPE_CHECKING:
    from agentd.inference.service import InferenceService

__all__ = ["METHOD_PATHS", "SERVICE", "KServeGrpcApp", "KServeGrpcService", "kserve_grpc_app"]

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
_METHODS = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods
METHOD_PATHS = tuple(f"/{SERVICE}/{m.name}" for m in _METHODS)

# Extensions agentd does not implement are refused, never silently ignored.
_UNSUPPORTED_INPUT = ("shared_memory_region",)
_UNSUPPORTED_OUTPUT = ("shared_memory_region", "classification")


class KServeGrpcService:
    """The connect-python service object for ``inference.GRPCInferenceService``."""

    def __init__(
        self, service: InferenceService, *, ready: Callable[[], bool] | None = None
    ) -> None:
        self._service = service
        # ServerReady: the node's readiness in a gateway (default: the service's own).
        self._ready = ready or service.ready

    async def server_live(
        self, request: pb.ServerLiveRequest, ctx: RequestContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self._service.live())

    async def server_ready(
        self, request: pb.ServerReadyRequest, ctx: RequestContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._ready())

    async def model_ready(
        self, request: pb.ModelReadyRequest, ctx: RequestContext
    ) -> pb.ModelReadyResponse:
        try:
            ready = self._service.is_ready(request.name, request.version or None)
        except AgentdError as exc:
            raise to_connect_error(exc) from exc
        return pb.ModelReadyResponse(ready=ready)

    async def server_metadata(
        self, request: pb.ServerMetadataRequest, ctx: RequestContext
    ) -> pb.ServerMetadataResponse:
        meta = self._service.server_metadata()
        return pb.ServerMetadataResponse(
            name=meta["name"], version=meta["version"], extensions=meta["extensions"]
        )

    async def model_metadata(
        self, request: pb.ModelMetadataRequest, ctx: RequestContext
    ) -> pb.ModelMetadataResponse:
        try:
            meta = self._service.metadata(request.name, request.version or None)
        except AgentdError as exc:
            raise to_connect_error(exc) from exc
        return _metadata_response(meta)

    async def model_infer(
        self, request: pb.ModelInferRequest, ctx: RequestContext
    ) -> pb.ModelInferResponse:
        name, version = request.model_name, request.model_version or None
        try:
            call = call_timeout(ctx)
            timeout = request_timeout(request)
            # Unknown model first: NOT_FOUND tells more than complaints about the tensors.
            self._service.metadata(name, version)
            # The service resolves the deadline from both times, exactly as over REST.
            response = await self._service.infer_request(
                InferenceRequest(
                    name,
                    decode_inputs(request),
                    version=version,
                    outputs=requested_outputs(request),
                    timeout=timeout,
                    call_timeout=call,
                )
            )
            return encode_response(response, request.id)
        except AgentdError as exc:
            raise to_connect_error(exc) from exc
        except Exception as exc:
            # A bug, not the client's fault: keep the details in the log, not on the wire.
            log.exception("KServe ModelInfer for %r failed", name)
            raise ConnectError(ConnectCode.INTERNAL, "internal error") from exc


def request_timeout(request: pb.ModelInferRequest) -> float | None:
    """The request-level ``timeout`` parameter in seconds (microseconds on the wire, as in
    Triton and KServe REST; 0 or absent: none)."""
    if "timeout" not in request.parameters:
        return None
    param = request.parameters["timeout"]
    kind = param.WhichOneof("parameter_choice")
    value = getattr(param, kind) if kind in ("int64_param", "uint64_param") else -1
    if value < 0:
        raise InvalidArgument("parameter 'timeout' must be an integer number of microseconds")
    return value / 1_000_000 if value else None


def decode_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """The request's input tensors; raw contents become read-only views, not copies."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
            "send one per input, in order, or none"
        )
    inputs: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        if not name:
            raise InvalidArgument(f"inputs[{index}] has no name")
        if name in inputs:
            raise InvalidArgument(f"input {name!r} is given twice")
        _refuse(tensor.parameters, _UNSUPPORTED_INPUT, f"input {name!r}")
        fields = {field.name: values for field, values in tensor.contents.ListFields()}
        if raw:
            if fields:
                raise InvalidArgument(
                    f"input {name!r} has contents although the request uses raw_input_contents"
                )
            inputs[name] = decode_raw(name, tensor.datatype, list(tensor.shape), raw[index])
        else:
            inputs[name] = decode_contents(name, tensor.datatype, list(tensor.shape), fields)
    return inputs


def requested_outputs(request: pb.ModelInferRequest) -> list[str] | None:
    """Requested output names in order; None for every output of the model."""
    names: list[str] = []
    for index, output in enumerate(request.outputs):
        if not output.name:
            raise InvalidArgument(f"outputs[{index}] has no name")
        if output.name in names:
            raise InvalidArgument(f"output {output.name!r} is requested twice")
        _refuse(output.parameters, _UNSUPPORTED_OUTPUT, f"output {output.name!r}")
        names.append(output.name)
    return names or None


def encode_response(answer: InferenceResponse, request_id: str) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(
        model_name=answer.model, model_version=answer.version, id=request_id
    )
    for name, array in answer.outputs.items():
        response.outputs.add(name=name, datatype=datatype_of(array).value, shape=array.shape)
        response.raw_output_contents.append(encode_raw(array))
    return response


def _metadata_response(meta: ModelMetadata) -> pb.ModelMetadataResponse:
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=meta.name,
        versions=[meta.version],
        platform=meta.platform,
        inputs=[tensor(name=t.name, datatype=t.datatype.value, shape=t.shape) for t in meta.inputs],
        outputs=[
            tensor(name=t.name, datatype=t.datatype.value, shape=t.shape) for t in meta.outputs
        ],
    )


def _refuse(params: Container[str], names: tuple[str, ...], where: str) -> None:
    for name in names:
        if name in params:
            raise InvalidArgument(f"{where}: parameter {name!r} is not supported by agentd")


class KServeGrpcApp(GRPCInferenceServiceASGIApplication):
    """The generated ASGI app plus ``method_paths``, like the gateway's other RPC apps."""

    method_paths = METHOD_PATHS
    streaming_requests = frozenset(f"/{SERVICE}/{m.name}" for m in _METHODS if m.client_streaming)


def kserve_grpc_app(
    service: InferenceService, read_max_bytes: int, *, ready: Callable[[], bool] | None = None
) -> KServeGrpcApp:
    """The ASGI app serving ``/inference.GRPCInferenceService/*`` (gRPC, gRPC-Web, Connect)."""
    return KServeGrpcApp(
        KServeGrpcService(service, ready=ready),
        read_max_bytes=read_max_bytes,
        compressions=compressions(read_max_bytes),
    )
