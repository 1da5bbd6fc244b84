"""The Inference service's method handlers, registered from the proto's own description.

They differ from the generated `add_InferenceServicer_to_server` in one way: a request body
that does not parse (malformed protobuf, or a string field that is not valid UTF-8) reaches
the servicer as a `MalformedRequest` instead of failing inside gRPC, so the client gets
INVALID_ARGUMENT with a plain message rather than UNKNOWN naming a Python class.
"""
from __future__ import annotations

from typing import Any, Callable

import grpc
from google.protobuf import message_factory

from lumen.v1 import inference_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Inference"]


class MalformedRequest:
    """A request body that is not a valid message of its type."""

    def __init__(self, type_name: str, error: Exception) -> None:
        self.type_name = type_name
        self.error = error

    def message(self) -> str:
        return (f"the request is not a valid {self.type_name}: malformed protobuf, or a string field that is "
                "not valid UTF-8")


def parse_or_mark(message_type: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except Exception as exc:  # protobuf's DecodeError, whatever the bytes
            return MalformedRequest(message_type.DESCRIPTOR.full_name, exc)
    return parse


def add_inference_service(servicer: Any, server: grpc.aio.Server) -> None:
    """Register every method of lumen.v1.Inference on `server`, served by `servicer`'s methods."""
    handlers = {}
    for method in SERVICE.methods:
        request_type = message_factory.GetMessageClass(method.input_type)
        response_type = message_factory.GetMessageClass(method.output_type)
        make = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[(method.client_streaming,
                                                                       method.server_streaming)]
        handlers[method.name] = make(getattr(servicer, method.name), request_deserializer=parse_or_mark(request_type),
                                     response_serializer=response_type.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
