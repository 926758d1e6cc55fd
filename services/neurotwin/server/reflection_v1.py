"""gRPC server reflection ``grpc.reflection.v1`` beside ``v1alpha``.

Current grpcurl (and Postman, grpcui) ask ``grpc.reflection.v1.ServerReflection`` first. grpcio-
reflection only ships v1alpha. The two versions of the protocol differ in their package name only:
every message has the same fields with the same numbers, so their wire bytes are identical. Here
the v1 service is registered under its own name, reading and writing those bytes with the v1alpha
servicer's logic, and the v1 descriptors (v1alpha's, renamed) are added to the descriptor pool so
that reflection can describe the v1 service too.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as alpha_pb2

PACKAGE = "grpc.reflection.v1"
SERVICE_NAME = f"{PACKAGE}.ServerReflection"
METHOD = "ServerReflectionInfo"
FILE_NAME = "grpc/reflection/v1/reflection.proto"
_ALPHA_PACKAGE = alpha_pb2.DESCRIPTOR.package


def _v1_file_proto() -> descriptor_pb2.FileDescriptorProto:
    """The v1 reflection.proto: v1alpha's messages and service under the v1 package."""
    proto = descriptor_pb2.FileDescriptorProto()
    alpha_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = FILE_NAME
    proto.package = PACKAGE
    proto.ClearField("options")
    old, new = f".{_ALPHA_PACKAGE}.", f".{PACKAGE}."

    def rename(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
        for message in messages:
            for field in message.field:
                if field.type_name.startswith(old):
                    field.type_name = new + field.type_name[len(old) :]
            rename(message.nested_type)

    rename(proto.message_type)
    for service in proto.service:
        for method in service.method:
            method.input_type = new + method.input_type[len(old) :]
            method.output_type = new + method.output_type[len(old) :]
    return proto


def register_descriptors(
    pool: descriptor_pool.DescriptorPool | None = None,
) -> descriptor_pool.DescriptorPool:
    """Add the v1 descriptors to ``pool`` (the default pool) unless something added them already."""
    pool = pool or descriptor_pool.Default()
    try:
        pool.FindServiceByName(SERVICE_NAME)
    except KeyError:
        pool.Add(_v1_file_proto())
    return pool


def message_class(name: str, pool: descriptor_pool.DescriptorPool | None = None) -> type[Message]:
    """A v1 message class, e.g. ``message_class("ServerReflectionRequest")`` (clients, tests)."""
    pool = register_descriptors(pool)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))


def enable(service_names: Iterable[str], server: grpc.Server) -> None:
    """Serve grpc.reflection.v1 on ``server``, listing ``service_names``."""
    register_descriptors()
    servicer = reflection.ReflectionServicer(list(service_names))
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        # Same field numbers in v1 and v1alpha: the v1alpha classes parse and write v1's bytes.
        request_deserializer=alpha_pb2.ServerReflectionRequest.FromString,
        response_serializer=alpha_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {METHOD: handler}),))
