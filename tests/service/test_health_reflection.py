"""Health answers SERVING and reflection lists the API, so grpcurl and ghz need no proto file."""
from __future__ import annotations

from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc


async def test_health_serving(stories):
    stub = health_pb2_grpc.HealthStub(stories.channel)
    for service in ("", "lumen.v1.Inference"):
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_inference(stories):
    stub = reflection_pb2_grpc.ServerReflectionStub(stories.channel)

    async def requests():
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        yield reflection_pb2.ServerReflectionRequest(file_containing_symbol="lumen.v1.Inference")

    responses = [r async for r in stub.ServerReflectionInfo(requests())]
    names = {s.name for s in responses[0].list_services_response.service}
    assert {"lumen.v1.Inference", "grpc.health.v1.Health"} <= names
    assert responses[1].file_descriptor_response.file_descriptor_proto  # the proto itself is served
