"""gRPC server reflection (v1 and v1alpha), so grpcurl can list and call our services."""

from __future__ import annotations

from collections.abc import AsyncIterator

from connectrpc.request import RequestContext
from connectrpc.server import Endpoint
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_reflection.v1alpha import reflection_pb2 as rpb

from agentd.errors import Code
from agentd.gateway.services import ServiceApp, method

__all__ = ["REFLECTION_SERVICES", "ReflectionService", "reflection_apps"]

# v1 and v1alpha messages are the same on the wire; one set of classes serves both.
REFLECTION_SERVICES = (
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
)


class ReflectionService:
    """Answers reflection requests from the default descriptor pool."""

    def __init__(self, service_names: list[str]) -> None:
        self._service_names = sorted(service_names)
        self._pool = descriptor_pool.Default()

    async def info(
        self, requests: AsyncIterator[rpb.ServerReflectionRequest], ctx: RequestContext
    ) -> AsyncIterator[rpb.ServerReflectionResponse]:
        async for request in requests:
            yield self.answer(request)

    def answer(self, request: rpb.ServerReflectionRequest) -> rpb.ServerReflectionResponse:
        response = rpb.ServerReflectionResponse(valid_host=request.host, original_request=request)
        kind = request.WhichOneof("message_request")
        try:
            if kind == "list_services":
                response.list_services_response.service.extend(
                    rpb.ServiceResponse(name=name) for name in self._service_names
                )
            elif kind == "file_by_filename":
                self._files(response, self._pool.FindFileByName(request.file_by_filename))
            elif kind == "file_containing_symbol":
                symbol = request.file_containing_symbol
                self._files(response, self._pool.FindFileContainingSymbol(symbol))
            else:
                _error(response, Code.UNIMPLEMENTED, f"{kind} is not supported")
        except KeyError as exc:
            _error(response, Code.NOT_FOUND, f"not found: {exc.args[0] if exc.args else exc}")
        return response

    @staticmethod
    def _files(response: rpb.ServerReflectionResponse, file: FileDescriptor) -> None:
        # The file and everything it imports, so the client can resolve every type.
        seen: set[str] = set()
        stack = [file]
        out = response.file_descriptor_response.file_descriptor_proto
        while stack:
            current = stack.pop()
            if current.name in seen:
                continue
            seen.add(current.name)
            proto = descriptor_pb2.FileDescriptorProto()
            current.CopyToProto(proto)
            out.append(proto.SerializeToString())
            stack.extend(current.dependencies)


def _error(response: rpb.ServerReflectionResponse, code: Code, message: str) -> None:
    response.error_response.error_code = code.value
    response.error_response.error_message = message


def reflection_apps(service: ReflectionService) -> list[ServiceApp]:
    req, res = rpb.ServerReflectionRequest, rpb.ServerReflectionResponse
    return [
        ServiceApp(
            f"/{name}",
            {
                f"/{name}/ServerReflectionInfo": Endpoint.bidi_stream(
                    method=method(name, "ServerReflectionInfo", req, res), function=service.info
                )
            },
            read_max_bytes=64 * 1024,
        )
        for name in REFLECTION_SERVICES
    ]
