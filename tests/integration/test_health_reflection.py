"""Standard gRPC services: health (grpcio-health-checking's client) and reflection."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2 as rpb
from grpc_reflection.v1alpha import reflection_pb2_grpc as rpb_grpc


def test_health_check_serving(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    assert (
        stub.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    )
    named = stub.Check(health_pb2.HealthCheckRequest(service="agentd.v1.AgentService"))
    assert named.status == health_pb2.HealthCheckResponse.SERVING


def test_health_check_unknown_service_not_found(channel):
    with pytest.raises(grpc.RpcError) as err:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_watch_sends_current_status(channel):
    stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=5)
    first = next(stream)
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    stream.cancel()


def _reflect(channel, service: str, *requests: rpb.ServerReflectionRequest):
    info = channel.stream_stream(
        f"/{service}/ServerReflectionInfo",
        request_serializer=rpb.ServerReflectionRequest.SerializeToString,
        response_deserializer=rpb.ServerReflectionResponse.FromString,
    )
    return list(info(iter(requests)))


@pytest.mark.parametrize(
    "service", ["grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"]
)
def test_reflection_lists_services(channel, service):
    (response,) = _reflect(channel, service, rpb.ServerReflectionRequest(list_services=""))
    names = {s.name for s in response.list_services_response.service}
    assert {"agentd.v1.AgentService", "grpc.health.v1.Health"} <= names


def test_reflection_lets_a_client_call_without_stubs(channel):
    """What grpcurl does: fetch descriptors, build messages at run time, call."""
    stub = rpb_grpc.ServerReflectionStub(channel)
    (response,) = stub.ServerReflectionInfo(
        iter([rpb.ServerReflectionRequest(file_containing_symbol="agentd.v1.AgentService")])
    )
    pool = descriptor_pool.DescriptorPool()
    protos = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in response.file_descriptor_response.file_descriptor_proto
    ]
    pending = {p.name: p for p in protos}
    while pending:  # add files after their dependencies
        for name, proto in list(pending.items()):
            if all(dep not in pending for dep in proto.dependency):
                pool.Add(proto)
                del pending[name]
    service = pool.FindServiceByName("agentd.v1.AgentService")
    method = service.methods_by_name["Invoke"]
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    request = request_cls(agent="echo/reflected")
    request.message.text = "dynamic"
    call = channel.unary_unary(
        f"/{service.full_name}/{method.name}",
        request_serializer=request_cls.SerializeToString,
        response_deserializer=response_cls.FromString,
    )
    reply = call(request)
    assert reply.agent == "echo/reflected"
    assert reply.message.text == "dynamic"


def test_reflection_unknown_symbol_is_error_response(channel):
    (response,) = _reflect(
        channel,
        "grpc.reflection.v1.ServerReflection",
        rpb.ServerReflectionRequest(file_containing_symbol="no.such.Thing"),
    )
    assert response.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
