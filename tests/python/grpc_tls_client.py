#!/usr/bin/env python3
"""A stock gRPC client (grpcio) driving a jit-gate agent over mutual TLS
with nothing but server reflection: no .proto file, no generated code.

Usage: grpc_tls_client.py TARGET CA CERT KEY SOURCE
Prints one JSON object: the services reflection lists, the health status,
the agent's mode and the grant a RequestAccess for SOURCE on 22/tcp made.
"""

import json
import sys

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def main():
    target, ca, cert, key, source = sys.argv[1:6]
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(ca), private_key=read(key), certificate_chain=read(cert)
    )
    out = {}
    with grpc.secure_channel(target, credentials) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        out["services"] = sorted(database.get_services())
        pool = descriptor_pool.DescriptorPool(database)

        def call(service_name, method, /, **fields):
            descriptor = pool.FindServiceByName(service_name).FindMethodByName(method)
            request = message_factory.GetMessageClass(descriptor.input_type)
            response = message_factory.GetMessageClass(descriptor.output_type)
            stub = channel.unary_unary(
                f"/{service_name}/{method}",
                request_serializer=request.SerializeToString,
                response_deserializer=response.FromString,
            )
            return stub(request(**fields), timeout=10)

        health = call("grpc.health.v1.Health", "Check", service="")
        status_enum = health.DESCRIPTOR.fields_by_name["status"].enum_type
        out["health"] = status_enum.values_by_number[health.status].name
        out["mode"] = call("jitgate.v1.JitGate", "GetStatus").configured_mode
        granted = call(
            "jitgate.v1.JitGate",
            "RequestAccess",
            request_id="python-grpcio-1",
            ports=[{"port": 22, "protocol": "PROTOCOL_TCP", "source": source}],
            duration={"seconds": 600},
            requester="python",
        )
        out["grants"] = [
            {"id": g.id, "principal": g.principal, "source": g.source, "port": g.port}
            for g in granted.grants
        ]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
